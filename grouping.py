"""HierNet's class grouping from a confusion probability matrix (Tempfli & Sandor, section 4).

The confusion probability matrix (CPM) of a trained backbone on the validation split holds in
row i the average softmax vector of the images of true class i. The proximity of two classes
is CPM[a][b] + CPM[b][a]; the proximity of two groups is the average over all class pairs
across them. Starting from singletons, the closest pair of groups is merged while the merged
size stays within g_max and the proximity exceeds p_min. Applied again inside every group it
builds deeper trees (`--depth`).

The command line groups a saved CPM, or a hiernet.py run's cpm.npy (the backbone's CPM on the
validation half, written by its grouping stage), again; it imports no training script:

    python grouping.py --cpm runs/hiernet-x/cpm.npy --names class_names.json
    python grouping.py --run-dir runs/hiernet-x --p-min 0.0075 --g-max 50 --depth 2

With --run-dir, --g-max, --p-min and --depth not given are the run's own (its args.json);
otherwise the paper's 50, 0.0075 and 1. Output: a tree JSON (`--out`; .txt and .dot beside it)
and the printout. hiernet.py imports from here the algorithm, the trees of --tree-from random and
dataset, the tree files and its whole tree stage (`run_tree`: section 4 as the run applies it).

Paper vs ours:
- The paper only says that the algorithm is "applied recursively on the created groups" for
  deeper trees. Run again inside a group with the same g_max and p_min it would rebuild that
  same group (every merge inside it already passed both tests), so a deeper level needs
  tighter limits. `--g-max` and `--p-min` take one value per level; a level without its own
  g_max uses half the size of the group being split (the paper's reason for g_max 50 with 100
  classes: no group holds more than half the classes), a level without its own p_min reuses
  the last one. A group is split only when that yields 2 or more subgroups that are not all
  singletons; otherwise it stays a leaf group.
- Ties between equally close pairs go to the pair of lowest group indices (the paper says
  nothing); groups are listed by their smallest class index, classes ascending.
"""

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

import common


def names_file(text):
    """argparse type of --names: a JSON list of class-name strings (the list is returned)."""
    try:
        names = json.loads(Path(text).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{text}: unreadable JSON ({type(e).__name__}: {e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise argparse.ArgumentTypeError(f"{text}: expected a JSON list of class names (strings)")
    return names


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.one_line_errors(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cpm", type=cpm_file, help="a saved confusion probability matrix (.npy, C x C)")
    source.add_argument("--run-dir", type=common.nonempty, help="a hiernet.py run directory: its cpm.npy, regrouped")
    parser.add_argument("--names", type=names_file, help="JSON list of class names for --cpm (default: class0, ...)")
    pos, nonneg = common.positive_int, common.nonneg_float
    parser.add_argument("--g-max", type=pos, nargs="+", help="largest group, per level (50, or the run's)")
    parser.add_argument("--p-min", type=nonneg, nargs="+", help="merge proximity, per level (0.0075, or the run's)")
    parser.add_argument("--depth", type=pos, help="levels of groups (1: root -> groups -> classes; or the run's)")
    parser.add_argument("--out", type=common.nonempty, help="write the tree JSON here (the printout beside it, .txt)")
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


def check_cpm(cpm, source):
    """A CPM must be a non-empty square matrix of finite, non-negative numbers; else one line."""
    cpm = np.asarray(cpm)
    if cpm.ndim != 2 or cpm.shape[0] != cpm.shape[1] or cpm.size == 0:
        return f"{source}: expected a square C x C matrix with C >= 1, got shape {cpm.shape}"
    if not np.issubdtype(cpm.dtype, np.number) or np.issubdtype(cpm.dtype, np.complexfloating):
        return f"{source}: expected real numbers, got dtype {cpm.dtype}"
    if not np.isfinite(cpm).all():
        return f"{source}: NaN or infinite entries ({int((~np.isfinite(cpm)).sum())} of {cpm.size})"
    if (cpm < 0).any():
        return f"{source}: negative entries ({int((cpm < 0).sum())} of {cpm.size}); a CPM holds average probabilities"
    return None


def cpm_file(text):
    """argparse type of --cpm: a readable .npy holding a valid CPM (the path is returned)."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: file not found")
    try:
        cpm = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise argparse.ArgumentTypeError(
            f"{text}: not a readable .npy file ({type(e).__name__}); save the matrix with numpy.save"
        ) from None
    problem = check_cpm(cpm, text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def group_proximity(cpm, group_a, group_b):
    """Average of CPM[a][b] + CPM[b][a] over all pairs (a in group_a, b in group_b)."""
    cpm = np.asarray(cpm, dtype=np.float64)
    block = cpm[np.ix_(group_a, group_b)] + cpm[np.ix_(group_b, group_a)].T
    return float(block.mean())


def group_classes(cpm, classes=None, g_max=50, p_min=0.0075):
    """Agglomerative grouping of `classes` (default all) by the paper's rule.

    Keeps, for every pair of groups, the sum of pairwise proximities, so a merge is a row and
    column addition; the average is that sum over |G1| |G2|. Returns a list of groups (sorted
    lists of class indices), sorted by their smallest class."""
    cpm = np.asarray(cpm, dtype=np.float64)
    classes = list(range(len(cpm))) if classes is None else [int(c) for c in classes]
    symmetric = cpm + cpm.T
    pair_sum = symmetric[np.ix_(classes, classes)].copy()
    groups = [[c] for c in classes]
    while len(groups) > 1:
        sizes = np.array([len(g) for g in groups], dtype=np.float64)
        proximity = pair_sum / np.outer(sizes, sizes)
        allowed = (sizes[:, None] + sizes[None, :] <= g_max) & (proximity > p_min)
        np.fill_diagonal(allowed, False)
        if not allowed.any():
            break
        i, j = np.unravel_index(np.argmax(np.where(allowed, proximity, -np.inf)), proximity.shape)
        i, j = min(i, j), max(i, j)
        pair_sum[i, :] += pair_sum[j, :]
        pair_sum[:, i] += pair_sum[:, j]
        pair_sum = np.delete(np.delete(pair_sum, j, 0), j, 1)
        groups[i] = groups[i] + groups[j]
        del groups[j]
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def build_tree(cpm, depth=1, g_max=(50,), p_min=(0.0075,), classes=None):
    """The grouping applied `depth` times, top down.

    A tree is a list of children; a child is a leaf group (a list of class indices) or a
    subtree (a list of lists). Level l uses g_max[l] (else half the size of the group being
    split) and p_min[l] (else the last p_min given)."""
    g_max, p_min = list(np.atleast_1d(g_max)), list(np.atleast_1d(p_min))
    groups = group_classes(cpm, classes, g_max[0], p_min[0])
    return [_split_group(cpm, g, 1, depth, g_max, p_min) for g in groups]


def _split_group(cpm, group, level, depth, g_max, p_min):
    if level >= depth or len(group) < 3:
        return group
    limit = int(g_max[level]) if level < len(g_max) else len(group) // 2
    sub = group_classes(cpm, group, limit, p_min[min(level, len(p_min) - 1)])
    if len(sub) < 2 or len(sub) == len(group):  # no split, or only singletons: keep one leaf group
        return group
    return [_split_group(cpm, g, level + 1, depth, g_max, p_min) for g in sub]


def is_leaf_group(node):
    return all(isinstance(c, (int, np.integer)) for c in node)


def tree_leaves(tree):
    """Class indices in tree order (depth first, left to right)."""
    if is_leaf_group(tree):
        return [int(c) for c in tree]
    return [c for child in tree for c in tree_leaves(child)]


def tree_depth(tree):
    """Levels of groups: 1 for root -> groups -> classes."""
    if is_leaf_group(tree):
        return 0
    return 1 + max(tree_depth(child) for child in tree)


def tree_sizes(tree):
    """The tree's shape without its classes: a leaf group's size, a subtree's list of its children's shapes."""
    if is_leaf_group(tree):
        return len(tree)
    return [tree_sizes(child) for child in tree]


def top_level_groups(tree, num_classes):
    """(the classes of each top-level group, the top-level group of each class)."""
    top_groups = [tree_leaves(child) for child in tree]
    group_of = np.zeros(num_classes, dtype=np.int64)
    for g, classes in enumerate(top_groups):
        group_of[classes] = g
    return top_groups, group_of


# Mixed into the random tree's seed so that its generator is its own, apart from any other use of the seed.
RANDOM_TREE_STREAM = 0x7A3E


def random_tree(tree, seed):
    """The control of `hiernet.py --tree-from random`: `tree`'s shape (every group's size, at every
    level, in order) with the classes assigned to its places at random; classes ascending within a
    leaf group, as build_tree lists them. Its own generator from `seed` (numpy, not torch's global
    one, so the rest of the run draws the same numbers as the CPM tree's run)."""
    rng = np.random.default_rng([RANDOM_TREE_STREAM, int(seed)])
    shuffled = iter(rng.permutation(tree_leaves(tree)).tolist())

    def fill(node):
        if is_leaf_group(node):
            return sorted(next(shuffled) for _ in node)
        return [fill(child) for child in node]

    return fill(tree)


def dataset_tree(hierarchy, levels, classes):
    """`hiernet.py --tree-from dataset`: nested groups from the hierarchy's coarse `levels` (coarsest first)
    over `classes`."""
    parent = hierarchy.parents[levels[0]][classes]
    groups = [classes[parent == p] for p in np.unique(parent)]
    if len(levels) == 1:
        return [g.tolist() for g in groups]
    return [dataset_tree(hierarchy, levels[1:], g) for g in groups]


def validate_tree(tree, num_classes, source="tree"):
    """Every class exactly once, no empty group, at least one level of groups."""
    if not isinstance(tree, list) or not tree:
        common.fail(f"{source}: a tree must be a non-empty list of groups")

    def walk(node, depth):
        if depth > common.MAX_HIERARCHY_DEPTH:
            common.fail(f"{source}: nested deeper than {common.MAX_HIERARCHY_DEPTH} levels")
        if not isinstance(node, list) or not node:
            common.fail(f"{source}: every group must be a non-empty list, got {node!r}")
        kinds = {isinstance(c, (int, np.integer)) for c in node}
        if len(kinds) > 1:
            common.fail(f"{source}: a group mixes classes and subgroups: {node!r}")
        if not kinds.pop():
            for child in node:
                walk(child, depth + 1)

    walk(tree, 0)
    if is_leaf_group(tree):
        common.fail(f"{source}: the top level must list groups, not classes")
    leaves = tree_leaves(tree)
    if sorted(leaves) != list(range(num_classes)):
        missing = sorted(set(range(num_classes)) - set(leaves))
        extra = sorted(c for c in set(leaves) if leaves.count(c) > 1 or not 0 <= c < num_classes)
        common.fail(
            f"{source}: every class 0..{num_classes - 1} must appear once; missing {missing[:5]}, "
            f"repeated or unknown {extra[:5]}"
        )
    return tree


def named_tree(tree, names):
    if is_leaf_group(tree):
        return [names[c] for c in tree]
    return [named_tree(child, names) for child in tree]


def tree_text(tree, names):
    """A readable printout: one line per group, indented by level."""
    lines = [f"root: {len(tree_leaves(tree))} classes, {len(tree)} groups"]

    def walk(node, label, indent):
        if is_leaf_group(node):
            lines.append(f"{indent}{label} ({len(node)}): {', '.join(names[c] for c in node)}")
            return
        lines.append(f"{indent}{label} ({len(tree_leaves(node))} classes, {len(node)} subgroups)")
        for i, child in enumerate(node):
            walk(child, f"{label}.{i + 1}", indent + "  ")

    for i, child in enumerate(tree):
        walk(child, f"GROUP {i + 1}", "  ")
    return "\n".join(lines) + "\n"


def tree_dot(tree, names):
    """The tree in Graphviz dot: root, group nodes, class leaves."""
    lines = ["digraph hiernet {", "  rankdir=LR;", "  node [shape=box, fontsize=10];", '  root [label="root"];']

    def walk(node, node_id, parent_id, label):
        lines.append(f'  {node_id} [label="{label}", shape=ellipse];')
        lines.append(f"  {parent_id} -> {node_id};")
        if is_leaf_group(node):
            for c in node:
                lines.append(f'  c{c} [label="{names[c]}"];')
                lines.append(f"  {node_id} -> c{c};")
        else:
            for i, child in enumerate(node):
                walk(child, f"{node_id}_{i + 1}", node_id, f"{label}.{i + 1}")

    for i, child in enumerate(tree):
        walk(child, f"g{i + 1}", "root", f"G{i + 1}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def tree_json(tree, names, **settings):
    return {
        **settings,
        "depth": tree_depth(tree),
        "tree": tree,
        "named_tree": named_tree(tree, names),
        "groups": [tree_leaves(child) for child in tree],
        "class_names": list(names),
    }


def load_tree(path, num_classes):
    """A tree JSON written by this script (or a bare nested list), validated."""
    path = Path(path)
    if not path.is_file():
        common.fail(f"--groups {path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        common.fail(f"--groups {path}: not valid JSON ({e})")
    except RecursionError:
        common.fail(f"--groups {path}: nested too deep to read (at most {common.MAX_HIERARCHY_DEPTH} levels)")
    tree = obj["tree"] if isinstance(obj, dict) and "tree" in obj else obj
    return validate_tree(tree, num_classes, source=str(path))


@torch.no_grad()
def confusion_probability_matrix(forward, loader, num_classes, *, device, dtype="bf16"):
    """CPM[i][j]: the average softmax probability of class j over the images of true class i."""
    logits, labels = common.predict(forward, loader, device=device, dtype=dtype)
    probs = logits.double().softmax(1)
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64).index_add_(0, labels, probs)
    counts = torch.bincount(labels, minlength=num_classes).clamp(min=1).double()
    return (sums / counts[:, None]).numpy()


def write_tree_files(path, tree, names, **settings):
    """The tree JSON at path (tree_json with settings), its printout (.txt) and graph (.dot) beside it;
    returns the printout."""
    text = tree_text(tree, names)
    common.write_json(path, tree_json(tree, names, **settings))
    common.write_text(path.with_suffix(".txt"), text)
    common.write_text(path.with_suffix(".dot"), tree_dot(tree, names))
    return text


# The tree stage of a hiernet.py run (its stages 2-3)


def run_tree(args, data, run_dir, backbone_cpm):
    """Stages 2-3 of a hiernet.py run: the grouping of the backbone's CPM (backbone_cpm(), called only
    when needed, or --cpm; saved as cpm.npy), the dataset's hierarchy (--tree-from dataset) or the
    given tree (--groups); with --tree-from random, that tree's shape with the classes assigned at
    random. A resumed run keeps its tree.json (its checkpoint was built on it). Returns (tree, what
    tree.json records of how it was made)."""
    settings = {"g_max": args.g_max, "p_min": args.p_min, "source": args.groups or args.tree_from}
    saved = run_dir / "tree.json"
    if args.resume and saved.is_file():
        made = json.loads(saved.read_text())
        kept = {k: v for k, v in made.items() if k not in ("depth", "tree", "named_tree", "groups", "class_names")}
        return load_tree(saved, data.num_classes), {**settings, **kept}
    if args.groups:
        tree = load_tree(args.groups, data.num_classes)
    elif args.tree_from == "dataset":
        hierarchy = data.hierarchy
        if hierarchy.n_levels - 1 < args.depth:
            common.fail(
                f"--tree-from dataset --depth {args.depth}: {data.name} has only "
                f"{hierarchy.n_levels - 1} coarse level(s)"
            )
        levels = list(range(hierarchy.n_levels - 1 - args.depth, hierarchy.n_levels - 1))
        tree = dataset_tree(hierarchy, levels, np.arange(data.num_classes))
    else:
        cpm = np.load(args.cpm, allow_pickle=False) if args.cpm else backbone_cpm()
        if args.cpm and cpm.shape != (data.num_classes, data.num_classes):
            common.fail(f"--cpm {args.cpm}: shape {cpm.shape}, expected {data.num_classes} x {data.num_classes}")
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(cpm))
        common.atomic_write_bytes(run_dir / "cpm.npy", buffer.getvalue())
        tree = build_tree(cpm, args.depth, args.g_max, args.p_min)
    if args.tree_from != "random":
        return tree, settings
    settings["source"] = "random"
    settings["random_tree"] = {
        "seed": args.seed,
        "generator": f"grouping.random_tree(from_tree, seed): numpy default_rng([{RANDOM_TREE_STREAM}, seed])",
        "from": args.groups or "cpm",
        "from_tree": tree,
        "from_sizes": tree_sizes(tree),
    }
    print(
        f"[hiernet] random tree (seed {args.seed}): the {args.groups or 'CPM'} tree's group sizes "
        f"{tree_sizes(tree)}, the classes assigned at random",
        flush=True,
    )
    return random_tree(tree, args.seed), settings


def save_run_tree(run_dir, tree, settings, names):
    """tree.json / tree.txt / tree.dot (and tree_copied.txt for a random tree), printed, with warnings."""
    print(write_tree_files(run_dir / "tree.json", tree, names, **settings), end="", flush=True)
    if "random_tree" in settings:  # the tree it copied the sizes of, readable beside it
        common.write_text(run_dir / "tree_copied.txt", tree_text(settings["random_tree"]["from_tree"], names))
    if len(tree) == 1:
        print(
            "[hiernet] warning: one group only; the super-class node has nothing to decide "
            "(lower --g-max or raise --p-min)",
            file=sys.stderr,
            flush=True,
        )
    if len(tree) > 32:  # e.g. a near-perfect backbone on easy data: few confusions, many singletons
        print(
            f"[hiernet] warning: {len(tree)} groups; every branch runs on every image in training, so the cost "
            "grows with the group count (lower --p-min)",
            file=sys.stderr,
            flush=True,
        )


# The command line: group a CPM again


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
    problem = check_cpm(cpm, str(path))
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
        cpm = np.load(args.cpm, allow_pickle=False)
        names = args.names or [f"class{i}" for i in range(len(cpm))]
        if len(names) != len(cpm):
            common.fail(f"--names: {len(names)} names for a {len(cpm)}-class CPM")
    else:
        cpm, names = cpm_from_run(args.run_dir)
    tree = build_tree(cpm, args.depth, args.g_max, args.p_min)
    if not args.out:
        sys.stdout.write(tree_text(tree, names))
    else:
        out = Path(args.out)
        sys.stdout.write(write_tree_files(out, tree, names, g_max=args.g_max, p_min=args.p_min))
        print(f"wrote {out}, {out.with_suffix('.txt')} and {out.with_suffix('.dot')}")
    return tree


if __name__ == "__main__":
    main()
