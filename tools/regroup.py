"""Regroup a CPM into a HierNet tree: the command line of grouping.py's algorithm (section 4).

Either a saved confusion probability matrix, or a hiernet.py run directory, whose cpm.npy (the
backbone's CPM on the validation half, written by the run's grouping stage) is grouped again:

    python tools/regroup.py --cpm runs/hiernet-x/cpm.npy --names class_names.json
    python tools/regroup.py --run-dir runs/hiernet-x --p-min 0.0075 --g-max 50 --depth 2

With --run-dir, --g-max, --p-min and --depth not given are the run's own (its args.json);
otherwise they default to the paper's 50, 0.0075 and 1. The class names of --run-dir are its
dataset's (common.load_data with the run's settings).

Output: a tree JSON (class indices and names) and a readable printout (`--out`, default stdout
only). The algorithm and its readings of the paper are grouping.py's docstring.

Why here and not in grouping.py: hiernet.py imports grouping.py, and the command line once
evaluated a run's backbone with hiernet.py's code, an import cycle. A run's cpm.npy is that same
matrix (hiernet.py computes it from the same backbone and validation half before grouping), so
the tool reads it and imports no training script.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # the checkout's shared modules, found through ROOT
import grouping


def names_file(text):
    """argparse type of --names: a JSON list of class-name strings (the path is returned)."""
    try:
        names = json.loads(Path(text).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text}: unreadable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise argparse.ArgumentTypeError(f"{text}: expected a JSON list of class names (strings)")
    return text


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.one_line_errors(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cpm", type=grouping.cpm_file, help="a saved confusion probability matrix (.npy, C x C)")
    source.add_argument("--run-dir", help="a hiernet.py run directory: its cpm.npy is grouped again")
    parser.add_argument(
        "--names", type=names_file, help="JSON list of class names for --cpm (default: class0, class1, ...)"
    )
    parser.add_argument(
        "--g-max",
        type=common.positive_int,
        nargs="+",
        default=None,
        help="largest group size, per level (default 50, or the run's)",
    )
    parser.add_argument(
        "--p-min",
        type=common.nonneg_float,
        nargs="+",
        default=None,
        help="proximity a merge must exceed, per level (default 0.0075, or the run's)",
    )
    parser.add_argument(
        "--depth",
        type=common.positive_int,
        default=None,
        help="levels of groups (1: root -> groups -> classes; default 1, or the run's)",
    )
    parser.add_argument("--out", help="write the tree JSON here (and the printout beside it, .txt)")
    args = parser.parse_args(argv)
    saved = Path(args.run_dir) / "args.json" if args.run_dir else None
    run = json.loads(saved.read_text()) if saved is not None and saved.is_file() else {}
    for name, default in (("g_max", [50]), ("p_min", [0.0075]), ("depth", 1)):
        if getattr(args, name) is None:
            setattr(args, name, run.get(name, default))
    if len(args.g_max) > args.depth or len(args.p_min) > args.depth:
        parser.error(f"--g-max / --p-min take at most one value per level (--depth {args.depth})")
    if args.out and Path(args.out).suffix.lower() in (".txt", ".dot"):
        parser.error(
            f"--out {args.out}: names the tree JSON; the .txt and .dot printouts go beside it (use e.g. tree.json)"
        )
    if args.out and Path(args.out).is_dir():
        parser.error(f"--out {args.out}: is a directory; give a file name such as {Path(args.out) / 'tree.json'}")
    if args.out:
        check_not_a_runs_file(Path(args.out))
    return args


def check_not_a_runs_file(out):
    """A regrouping never writes over a run's own files (hiernet.py --resume reads its tree.json):
    --out and its .txt / .dot must not be existing files of a run directory (a folder up the path
    with an args.json)."""
    for path in (out, out.with_suffix(".txt"), out.with_suffix(".dot")):
        if not path.exists():
            continue
        run = next((d for d in path.resolve().parents if (d / "args.json").is_file()), None)
        if run is not None:
            common.fail(
                f"--out {out}: {path} is a file of the run directory {run}; a regrouping does not replace a "
                f"run's files: choose another name (e.g. {out.with_name('regrouped.json')})"
            )


def cpm_from_run(run_dir):
    """A hiernet.py run's CPM (its cpm.npy) and its dataset's class names; returns (cpm, names)."""
    run_dir = Path(run_dir)
    if not (run_dir / "args.json").is_file():
        common.fail(f"--run-dir {run_dir}: no args.json; not a hiernet.py run directory")
    settings = common.read_run_args(run_dir, "--run-dir")
    common.check_run_script(settings, "hiernet", run_dir, "--run-dir")
    path = run_dir / "cpm.npy"
    if not path.is_file():
        common.fail(
            f"--run-dir {run_dir}: no cpm.npy (the run has not reached its grouping stage, or its tree came from "
            "--groups or --tree-from dataset); give a CPM with --cpm"
        )
    cpm = np.load(path, allow_pickle=False)
    problem = grouping.check_cpm(cpm, str(path))
    if problem:
        common.fail(problem)
    args = argparse.Namespace(**common.run_settings(settings))
    names = list(common.load_data(args).class_names)
    if len(names) != len(cpm):
        common.fail(f"--run-dir {run_dir}: {len(names)} classes in its dataset, a {len(cpm)}-class cpm.npy")
    return cpm, names


def main(argv=None):
    args = get_args(argv)
    if args.cpm:
        cpm = np.load(args.cpm)
        names = [f"class{i}" for i in range(len(cpm))]
        if args.names:
            names = json.loads(Path(args.names).read_text())
            if len(names) != len(cpm):
                common.fail(f"--names {args.names}: {len(names)} names for a {len(cpm)}-class CPM")
    else:
        cpm, names = cpm_from_run(args.run_dir)
    tree = grouping.build_tree(cpm, args.depth, args.g_max, args.p_min)
    text = grouping.tree_text(tree, names)
    sys.stdout.write(text)
    if args.out:
        out = Path(args.out)
        common.write_json(out, grouping.tree_json(tree, names, g_max=args.g_max, p_min=args.p_min))
        common.atomic_write_bytes(out.with_suffix(".txt"), text.encode())
        common.atomic_write_bytes(out.with_suffix(".dot"), grouping.tree_dot(tree, names).encode())
        print(f"wrote {out}, {out.with_suffix('.txt')} and {out.with_suffix('.dot')}")
    return tree


if __name__ == "__main__":
    main()
