"""Build the README's results section from the metrics files in results/.

Every number in the section is read from results/<run>/metrics.json (or results/bench.json); the
command and wall time come from results/<run>/run.json, written by tools/gpu_runs.py. A few figures of
results/figures/ go under their tables, those that `python tools/plots.py` has drawn (run it first).

    python tools/results_table.py                 # print the section
    python tools/results_table.py --write README.md   # replace it between the markers
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start (tools/results_table.py) -->", "<!-- results:end -->"


def load(run, results):
    path = results / run
    if not (path / "metrics.json").exists():
        return None, None
    return json.loads((path / "metrics.json").read_text()), json.loads((path / "run.json").read_text())


def wall(info):
    share = max(c["jobs_sharing_gpu"] for c in info["calls"])
    return f"{info['wall_seconds'] / 60:.1f} min" + (f" ({share} jobs shared the GPU)" if share > 1 else "")


def f2(x):
    return f"{x:.2f}"


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def severities(m, within=None):
    """Every mistake severity in a run's metrics (common.hierarchical_metrics dicts, wherever the
    script put them) as [(key path, value)], in file order; `within`: only paths through that key."""
    found = []

    def walk(node, path):
        if "mistake_severity" in node:
            found.append((path, node["mistake_severity"]))
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, path + (key,))

    walk(m, ())
    return [(path, value) for path, value in found if within is None or within in path]


def severity_cell(m, within=None):
    """'baseline 1.52, hdl 1.31': each severity named by the keys that set its path apart from the
    others' (the bare value when there is one); blank for a run without any (older runs)."""
    found = severities(m, within)
    if not found:
        return ""
    paths = [path for path, _ in found]
    shortest = min(len(path) for path in paths)
    head = next((i for i in range(shortest) if len({path[i] for path in paths}) > 1), shortest)
    tail = next((i for i in range(shortest - head) if len({path[-1 - i] for path in paths}) > 1), shortest - head)
    cells = []
    for path, value in found:
        name = "/".join(path[head : len(path) - tail])
        number = "-" if value is None else f2(value)  # None: no mistakes at all
        cells.append(f"{name} {number}" if name else number)
    return ", ".join(cells)


SEVERITY_HEADER = "mistake severity"


def figure_lines(results, *figures):
    """README image lines of the (file name, caption) figures that `python tools/plots.py` drew into
    results/figures/ (figures not drawn are left out), then a blank line."""
    lines = [
        f"![{caption}](results/figures/{name})" for name, caption in figures if (results / "figures" / name).exists()
    ]
    return lines + [""] if lines else []


def with_severity(header, body):
    """Table lines; the last cell of each body row is its severity cell, kept as a last column only
    when some row has one (so tables of runs from before the measure are unchanged)."""
    keep = any(cells[-1] for cells in body)
    if keep:
        header = header + [SEVERITY_HEADER]
    return [row(header), row(["---"] * len(header))] + [row(cells if keep else cells[:-1]) for cells in body]


COMMIT_HEADER = "commit"


def commit_cell(info):
    """The git commit the run's code was at (run.json of tools/gpu_runs.py; every commit of a run resumed
    over calls that spanned several), short, "(dirty)" where the checkout had uncommitted changes; blank
    for a run from before the queue recorded it."""
    states = [(c["git_commit"], c.get("git_dirty")) for c in info.get("calls", []) if c.get("git_commit")]
    if not states and info.get("git_commit"):
        states = [(info["git_commit"], info.get("git_dirty"))]
    return " / ".join(f"{commit[:7]}" + (" (dirty)" if dirty else "") for commit, dirty in dict.fromkeys(states))


def without_blank_column(header, body, name):
    """The table without column `name` when no row fills it (tables of runs from before it existed stay as
    they were)."""
    i = header.index(name)
    if any(cells[i] for cells in body):
        return header, body
    return header[:i] + header[i + 1 :], [cells[:i] + cells[i + 1 :] for cells in body]


def hiernet_rows(results, runs):
    out = []
    for run in runs:
        m, info = load(run, results)
        if m is None:
            out.append([f"`{run}`", "not run yet", "", "", "", "", "", "", "", ""])
            continue
        tree = " / ".join(str(s) for s in m["group_sizes"])
        out.append(
            [
                f"`{info['command']}`",
                m["n_groups"],
                tree,
                f2(m["backbone_acc"]),
                f2(m["slow_acc"]),
                f2(m["fast_acc"]),
                f2(m["superclass_acc"]),
                f"{m['backbone_epoch_seconds']:.1f} / {m['hiernet_epoch_seconds']:.1f} s; {wall(info)}",
                commit_cell(info),
                severity_cell(m),
            ]
        )
    return out


# Paper, Tables 1 and 2 (CIFAR-100): n -> (layers, backbone, slow, fast); the authors' code's super-class
# accuracy for n = 3..9 (their file header, ReLU runs).
HIERNET_TABLE1 = {
    3: (20, 65.96, 68.89, 68.08),
    5: (32, 67.08, 70.65, 70.45),
    7: (44, 68.12, 71.25, 70.75),
    9: (56, 68.38, 72.15, 72.01),
    18: (110, 71.33, 73.45, 73.27),
}
HIERNET_TABLE2 = {
    3: (20, 65.54, 68.30, 68.16),
    5: (32, 67.88, 70.71, 70.43),
    7: (44, 68.79, 70.83, 70.79),
    9: (56, 69.03, 72.47, 72.29),
    18: (110, 72.93, 74.37, 74.15),
}
HIERNET_AUTHORS_SUPER = {3: 86.23, 5: 90.28, 7: 88.40, 9: 90.60}


def hiernet_cifar100_rows(results, elu=False):
    """Table 1 (or 2 with elu) layout: one row per n, ours beside the paper's; mean +- std (sample std)
    over the seeds run where there are several (the seeds column); 'not run yet' where none is."""
    out = []
    for n, (layers, p_backbone, p_slow, p_fast) in (HIERNET_TABLE2 if elu else HIERNET_TABLE1).items():
        runs = hiernet_seed_runs(results, n, elu)
        if not runs:
            out.append([n, layers, "not run yet", *[""] * 11])
            continue
        seeds = [seed for seed, _, _ in runs]
        ms, infos = [m for _, m, _ in runs], [info for _, _, info in runs]
        authors_super = "" if elu else HIERNET_AUTHORS_SUPER.get(n, "")
        controlled = [(seed, m["control_acc"]) for seed, m, _ in runs if "control_acc" in m]
        control = cell([acc for _, acc in controlled]) if controlled else ""
        if controlled and len(controlled) < len(runs):  # not every seed ran it: say which did
            which = ", ".join(str(seed) for seed, _ in controlled)
            control += f" (seeds {which})" if len(controlled) > 1 else f" (seed {which})"
        severity = []
        for form in ("backbone", "slow"):
            values = [m["hierarchical"]["dataset"][form]["mistake_severity"] for m in ms if has_dataset_severity(m)]
            if values:
                severity.append(f2(sum(values) / len(values)))
        groups = (
            f"{ms[0]['n_groups']}: " + " / ".join(str(s) for s in ms[0]["group_sizes"])
            if len(ms) == 1
            else " / ".join(str(m["n_groups"]) for m in ms)
        )
        out.append(
            [
                n,
                layers,
                ", ".join(str(seed) for seed in seeds),
                f"{cell([m['backbone_acc'] for m in ms])} ({p_backbone})",
                f"{cell([m['slow_acc'] for m in ms])} ({p_slow})",
                f"{cell([m['fast_acc'] for m in ms])} ({p_fast})",
                f"{cell_signed([m['slow_acc'] - m['backbone_acc'] for m in ms])} ({p_slow - p_backbone:+.2f})",
                cell([m["superclass_acc"] for m in ms]) + (f" ({authors_super})" if authors_super else ""),
                control,
                groups,
                f"{ms[0]['backbone_params'] / 1e6:.2f}M / {ms[0]['hiernet_params'] / 1e6:.2f}M",
                "; ".join(wall(info) for info in infos),
                " / ".join(severity),
                " / ".join(c for c in dict.fromkeys(commit_cell(info) for info in infos) if c),
            ]
        )
    return out


def has_dataset_severity(m):
    forms = m.get("hierarchical", {}).get("dataset", {})
    return all("mistake_severity" in forms.get(form, {}) for form in ("backbone", "slow"))


def cell_signed(values):
    return mean_std(values) if len(values) > 1 else f"{values[0]:+.2f}"


# Table III's "reduction in test time per image" of the LH classifier against the FC one.
LATENT_PAPER_TEST_TIME = {"latent_string_mnist": 13.9, "latent_string_cifar10": 15.9, "latent_string_cifar100": 14.8}


def hiernet_seed_runs(results, n, elu=False):
    """[(seed, metrics, run info)] of HierNet at n on CIFAR-100 (ReLU, or ELU): seed 0 is the plain run."""
    found = []
    for seed in range(10):
        run = f"hiernet_cifar100_n{n}" + ("_elu" if elu else "") + (f"_seed{seed}" if seed else "")
        m, info = load(run, results)
        if m is not None:
            found.append((seed, m, info))
    return found


def mean_std(values):
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:.2f} +- {std:.2f}"


# Flags that do not make a stage-2 variant: paths, call settings, the sweeps, and the stage-2 seed
# (runs differing only in --lh-seed are one row).
LH_NOT_VARIANT = {
    *("out_dir", "base_from", "lh_seed", "resume", "force", "dry_run", "data_dir", "device", "cuda_graph"),
    *("compile", "overrides", "script", "bits_sweep", "hidden_sweep", "sweep_bits", "sweep_hidden"),
}


def flag_text(flag, value):
    name = "--" + flag.replace("_", "-")
    if value is True:
        return name
    if value is False:
        return "--no-" + flag.replace("_", "-")
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def cell(values):
    return mean_std(values) if len(values) > 1 else f2(values[0])


def latent_string_defaults():
    """Every flag of latent_string.py with its default."""
    sys.path.insert(0, str(ROOT))
    import latent_string

    return {a.dest: a.default for a in latent_string.make_parser()._actions if a.dest != "help"}


def lh_variant_rows(run_dirs, base_dir):
    """Stage-2 experiments on one frozen extractor (latent_string.py --base-from base_dir): one row
    per set of stage-2 flags that differ from the base run's, its --lh-seed runs pooled (mean +-
    sample std). Validation columns first: choices are made there. Returns (rows, FC test acc)."""
    # A flag missing from an older args.json had its default then, as --resume reads it.
    defaults = latent_string_defaults()
    base_args = {**defaults, **json.loads((base_dir / "args.json").read_text())}
    groups = {}
    for run in sorted(run_dirs, key=lambda d: d.name):
        args = {**defaults, **json.loads((run / "args.json").read_text())}
        m = json.loads((run / "metrics.json").read_text())
        differ = tuple(sorted((k, v) for k, v in args.items() if k not in LH_NOT_VARIANT and base_args.get(k) != v))
        seed = args["seed"] if args.get("lh_seed") is None else args["lh_seed"]
        groups.setdefault(differ, []).append((seed, m))
    rows, fc = [], None
    for differ in sorted(groups, key=lambda d: (len(d) > 0, str(d))):
        runs = sorted(groups[differ], key=lambda r: r[0])
        ms = [m for _, m in runs]
        fc = ms[0]["fc_test_acc"]
        lh, rc = [m["lh"] for m in ms], [m["random_code"] for m in ms]
        rows.append(
            [
                " ".join(f"`{flag_text(k, v)}`" for k, v in differ) or "defaults",
                ", ".join(str(seed) for seed, _ in runs),
                cell([r["val_lookup_acc"] for r in lh]),
                cell([r["val_lookup_acc"] for r in rc]),
                cell([r["exact_match_acc"] for r in lh]),
                cell([r["exact_match_acc"] for r in rc]),
                cell([a["exact_match_acc"] - b["exact_match_acc"] for a, b in zip(lh, rc)]),
                # the variant's own effect: the repair (more epochs on a fixed code) is the same for all
                cell([r.get("before_repair", r)["lookup_acc"] for r in lh]),
                " / ".join(str(len(r.get("before_repair", r)["duplicate_strings"])) for r in lh),
                f"{ms[0]['params']['lh_classifier']:,}",
                cell([m["reduced_fc_test_acc"] for m in ms]),
            ]
        )
    return rows, fc


LH_VARIANT_HEADER = [
    "stage-2 flags",
    "stage-2 seeds",
    "LH val",
    "random code val",
    "LH test",
    "random code test",
    "learnt - random (test)",
    "LH test before repair (lookup)",
    "strings shared before repair (per seed)",
    "LH params",
    "reduced FC test",
]


def lh_variant_tables(results):
    """The README lines of the stage-2 experiments: MNIST on the CPU, CIFAR-100 on its seed-1 extractor."""
    lines = []
    for title, base_dir, folder in (
        (
            "MNIST, on the CPU",
            results / "latent_string_mnist_cpu" / "seed0",
            results / "latent_string_mnist_cpu",
        ),
        (
            "CIFAR-100, on the extractor of `--seed 1`",
            results / "latent_string_cifar100_seed1",
            results / "latent_string_cifar100_seed1_variants",
        ),
    ):
        runs = [d for d in folder.glob("*") if (d / "metrics.json").exists() and d != base_dir]
        if not (base_dir / "metrics.json").exists():
            lines += [f"Stage-2 experiments, {title}: not run yet.", ""]
            continue
        rows, fc = lh_variant_rows([base_dir, *runs], base_dir)
        info = json.loads((base_dir / "run.json").read_text())
        device = info["device"].get("gpu") or info["device"].get("cpu")
        lines += [
            f"Stage-2 experiments, {title} ({device}, torch {info['device']['torch']}): the LH classifier "
            f"and its ablations retrained on one frozen extractor (`--base-from`), test and validation "
            f"(lookup) accuracy %; the extractor's own FC classifier: {f2(fc)} on test. Base run: "
            f"`{info['command']}` ({wall(info)}).",
            "",
            row(LH_VARIANT_HEADER),
            row(["---"] * len(LH_VARIANT_HEADER)),
            *(row(r) for r in rows),
            "",
        ]
    return lines


def table(header, body):
    return [row(header), row(["---"] * len(header))] + [row(cells) for cells in body]


def hiernet_control_rows(results):
    """Per n (3, 9): HierNet on the CPM tree and on the random tree (seed 0; the random tree is its own run:
    the same seed, so the same backbone up to GPU nondeterminism, the CPM tree's group sizes, classes
    assigned at random), and the backbone trained on as long (--control, part of a CPM run: seed 0's, else
    the lowest seed's that has it); each against its own run's backbone."""
    out = []
    for n in (3, 9):
        trees = (("CPM tree (the paper's)", ""), ("random tree", "_randomtree"))
        for label, run in ((label, f"hiernet_cifar100_n{n}{suffix}") for label, suffix in trees):
            m, info = load(run, results)
            if m is None:
                out.append([n, label, f"`{run}`: not run yet", *[""] * 8])
                continue
            out.append(
                [
                    n,
                    label,
                    f"`{run}`",
                    f2(m["backbone_acc"]),
                    f2(m["slow_acc"]),
                    f"{m['slow_acc'] - m['backbone_acc']:+.2f}",
                    f2(m["fast_acc"]),
                    f2(m["superclass_acc"]),
                    f"{m['n_groups']}: " + " / ".join(str(s) for s in m["group_sizes"]),
                    wall(info),
                    commit_cell(info),
                ]
            )
        label = "backbone trained as long (`--control`)"
        controlled = [(seed, m, info) for seed, m, info in hiernet_seed_runs(results, n) if "control_acc" in m]
        if not controlled:
            out.append([n, label, "not run yet", *[""] * 8])
            continue
        seed, m, info = controlled[0]
        run = f"`hiernet_cifar100_n{n}" + (f"_seed{seed}`" if seed else "`")
        gain = f"{m['control_acc'] - m['backbone_acc']:+.2f}"
        out.append([n, label, run, f2(m["backbone_acc"]), f2(m["control_acc"]), gain, *[""] * 4, commit_cell(info)])
    return out


def hiernet_control_table(results):
    """The README lines of the controls: does HierNet's gain come from grouping confusable classes, or from
    the capacity and training the tree adds?"""
    header = ["n", "tree", "run", "backbone", "accuracy (slow; the control's)", "accuracy - backbone", "fast"]
    header += ["super-class", "groups", "wall", COMMIT_HEADER]
    return [
        "Controls: where HierNet's gain comes from. The random tree (`--tree-from random`) keeps "
        "the number and sizes of the groups the CPM gives for the run's backbone and assigns the classes to them "
        "at random (seeded; `tree.json` records the seed and the CPM tree); everything else is the paper's run. "
        "The control trains the backbone on for HierNet's iterations on the same schedule. Each row's gain is "
        "against its own run's backbone.",
        "",
        *table(*without_blank_column(header, hiernet_control_rows(results), COMMIT_HEADER)),
        "",
    ]


def hiernet_seed_rows(results):
    """One row per seed of n = 3 and n = 9, then mean +- std (sample std) over the seeds run."""
    out = []
    for n in (3, 9):
        runs = hiernet_seed_runs(results, n)
        for seed, m, info in runs:
            out.append(
                [
                    n,
                    seed,
                    f2(m["backbone_acc"]),
                    f2(m["slow_acc"]),
                    f2(m["fast_acc"]),
                    f"{m['slow_acc'] - m['backbone_acc']:+.2f}",
                    f2(m["superclass_acc"]),
                    f2(m["control_acc"]) if "control_acc" in m else "",
                    f"{m['n_groups']}: " + " / ".join(str(s) for s in m["group_sizes"]),
                    wall(info) + (", compiled" if "--compile" in info["command"] else ""),
                    commit_cell(info),
                ]
            )
        if len(runs) > 1:
            column = {k: [m[k] for _, m, _ in runs] for k in ("backbone_acc", "slow_acc", "fast_acc", "superclass_acc")}
            gains = [m["slow_acc"] - m["backbone_acc"] for _, m, _ in runs]
            controls = [m["control_acc"] for _, m, _ in runs if "control_acc" in m]
            out.append(
                [
                    n,
                    f"mean +- std ({len(runs)} seeds)",
                    mean_std(column["backbone_acc"]),
                    mean_std(column["slow_acc"]),
                    mean_std(column["fast_acc"]),
                    mean_std(gains),
                    mean_std(column["superclass_acc"]),
                    mean_std(controls) if len(controls) > 1 else "",
                    "",
                    "",
                    "",
                ]
            )
    return out


MERGED_C100 = "merged_resnet_cifar100_resnet164"
MERGED_ALPHAS = (0.0, 0.5, 0.8, 0.9, 1.0, 1.1, 1.2, 1.5, 2.0)  # Figure 3's x axis, closer near 1


def merged_cifar100_run(results):
    """The CIFAR-100 ResNet-164 run with the most runs collected (MERGED_C100_runsN), or None."""
    steps = [p.parent.name for p in results.glob(f"{MERGED_C100}_runs*/metrics.json")]
    return max(steps, key=lambda name: int(name.rsplit("_runs", 1)[1]), default=None)


def merged_runs_support(m):
    """What a merged run's number of runs supports: its metrics' own sentences, or for an older
    run (before they were written) the script's, from the number of runs."""
    if "runs_support" in m:
        return m["runs_support"]
    sys.path.insert(0, str(ROOT))
    import merged_resnet  # imports torch: only for runs older than runs_support

    return merged_resnet.runs_support(m["runs"], [1, 2, 4])


def merged_alpha_tables(run, m):
    """Figure 3 as tables: test top-1 error % against alpha, one table per level, a row per ensemble
    size and architecture, mean +- std over runs (ensemble-1) or over combinations of runs."""
    alphas = [round(a, 1) for a in m["alphas"]]
    columns = [alphas.index(a) for a in MERGED_ALPHAS]
    order = list(m["costs"])
    curves = sorted(m["curves"].items(), key=lambda kv: (int(kv[0].split("-")[-1]), order.index(kv[0].split("/")[0])))
    sizes = sorted({int(key.split("-")[-1]) for key in m["curves"]})
    title = (
        f"`{run}`, {m['runs']} runs, ensembles of {', '.join(map(str, sizes))}: test top-1 error % against alpha "
        "(Figure 3), mean +- std over the runs, or over the combinations of runs for an ensemble; every alpha "
        "in its `alpha_curve.txt`. What its runs support:"
    )
    lines = [
        title,
        "",
        *(f"- {sentence}" for sentence in merged_runs_support(m)),
        *(
            ["- This run's metrics hold single models only (written before ensembles from runs)."]
            if sizes == [1]
            else []
        ),
        "",
    ]
    for level in ("coarse", "fine"):
        lines += [
            row([f"{level}: ensemble", "architecture", *(f"{a:.1f}" for a in MERGED_ALPHAS), "test minimum (alpha)"]),
            row(["---"] * (len(MERGED_ALPHAS) + 3)),
        ]
        for key, curve in curves:
            errors = curve["test"][level]  # members x alphas
            means = [sum(e[a] for e in errors) / len(errors) for a in range(len(alphas))]
            best = min(range(len(alphas)), key=lambda a: means[a])
            cells = [cell([e[a] for e in errors]) for a in columns]
            architecture, size = key.split("/")
            lines.append(row([size, architecture, *cells, f"{f2(means[best])} ({alphas[best]:.1f})"]))
        lines.append("")
    return lines


# The outer product's networks in the paper's table order: (metrics key, the paper's table).
OUTER_PRODUCT_TABLES = (
    ("baseline", "I, VGG16 baseline"),
    ("pretrain", "text, early-stopped VGG16 that builds CH / CVC"),
    ("coarse_ch", "III, CH coarse VGG13"),
    ("main_ch", "IV, CH outer-product network"),
    ("coarse_cvc", "V, CVC coarse VGG13"),
    ("main_cvc", "VI, CVC outer-product network"),
    ("ete", "VII, ETE end-to-end network"),
)


def outer_product_paper_tables(results):
    """Tables I, III-VII on CIFAR-100, ours beside the paper's (train / validation / test), and the
    weight-decay evidence: the baseline under both L2 conventions on train and validation only."""
    m, info = load("coarse_outer_product_cifar100", results)
    if m is None:
        return []
    a, paper = m["accuracy"], m["paper_cifar100"]
    header = ["table", "epochs", "train", "train (eval mode)", "val", "test", "paper train / val / test"]
    body = []
    for key, title in OUTER_PRODUCT_TABLES:
        if key not in a:
            continue
        r, p = a[key], paper[key]
        body.append(
            [
                title,
                str(r["epochs"]) + (f" (best {r['best_epoch']})" if "best_epoch" in r else ""),
                f2(r["train"]),
                f2(r.get("train_eval_mode")),
                f2(r["val"]),
                f2(r["test"]),
                " / ".join("-" if p[s] is None else f2(p[s]) for s in ("train", "val", "test")),
            ]
        )
    lines = [
        f"Tables I, III-VII on CIFAR-100 (`{info['command']}`, {info['device']['gpu']}, "
        f"commit {commit_cell(info) or 'not recorded'}): accuracy %, train as the paper's base code prints it "
        "(training mode, the reported epoch's running accuracy), the eval-mode figure on un-augmented "
        "training images beside it.",
        "",
        row(header),
        row(["---"] * len(header)),
        *(row(r) for r in body),
        "",
    ]
    keras, keras_info = load("coarse_outer_product_cifar100_baseline_keras", results)
    if keras is not None:
        rows = [
            [convention, f2(r["train"]), f2(r["train_eval_mode"]), f2(r["val"])]
            for convention, r in (
                (f"`--wd-convention {m['settings']['wd_convention']}` (default)", a["baseline"]),
                (f"`--wd-convention {keras['settings']['wd_convention']}`", keras["accuracy"]["baseline"]),
            )
        ]
        rows.append(["paper", f2(paper["baseline"]["train"]), "-", f2(paper["baseline"]["val"])])
        lines += [
            "The L2 reading, Table I's baseline under both conventions (same seed and split; train and "
            f"validation only, nothing chosen here; `{keras_info['command']}`):",
            "",
            row(["weight decay", "train", "train (eval mode)", "val"]),
            row(["---"] * 4),
            *(row(r) for r in rows),
            "",
        ]
    return lines


def section(results):
    lines = [START, ""]
    devices = sorted(
        {
            f"{d['gpu']}, torch {d['torch']}"
            for d in (json.loads(p.read_text())["device"] for p in results.glob("*/run.json"))
        }
    )
    backbone, _ = load("hiernet_cifar10_n3", results)
    resnet20 = (
        f": our ResNet-20 (HierNet's n=3 backbone) reaches {f2(backbone['backbone_acc'])}% on it against "
        "He et al.'s 91.25% on the original test set"
        if backbone
        else ""
    )
    lines += [
        f"Runs made by `python tools/gpu_runs.py` on one {' / '.join(devices)}. Wall times count the whole run; "
        "a run marked with the number of jobs that shared the GPU ran beside others (through MPS), so alone "
        "it is faster. Each run's folder in `results/` "
        "holds `metrics.json`, `metrics.jsonl` (per epoch), its tables, `train.log` and `run.json` "
        "(command, device, wall time and, for runs since the queue records it, the git commit of the code: a "
        "table shows a commit column once one of its runs has it; `(dirty)`: the checkout had uncommitted "
        "changes). CIFAR-10 here is the JPEG quality-75 copy of the real images, "
        f"which costs accuracy against the original files{resnet20}.",
        "",
    ]

    lines += [
        "### HierNet (`hiernet.py`), accuracy % on the test half (5k images for CIFAR-10)",
        "",
    ]
    hiernet_runs = ["hiernet_cifar10_n3", "hiernet_cifar10_n3_pmin0.075", "hiernet_cifar10_n9", "hiernet_shapes"]
    header = ["command", "groups", "group sizes", "backbone", "slow", "fast", "super-class"]
    header += ["epoch (backbone / HierNet); wall", COMMIT_HEADER]
    lines += with_severity(*without_blank_column(header, hiernet_rows(results, hiernet_runs), COMMIT_HEADER))
    missing = [f"`{run}`" for run in hiernet_runs if load(run, results)[0] is None]
    lines += [
        "",
        "The paper gives no CIFAR-10 accuracy." + (f" Not run: {', '.join(missing)}." if missing else ""),
        "",
    ]
    for elu, title in ((False, "Table 1 (ResNet)"), (True, "Table 2 (ELU ResNet)")):
        rows = hiernet_cifar100_rows(results, elu)
        if all(r[2] == "not run yet" for r in rows):
            lines += [f"HierNet on CIFAR-100, {title}: not run yet.", ""]
            continue
        header = [
            "n",
            "layers",
            "seeds",
            "backbone",
            "slow",
            "fast",
            "slow - backbone",
            "super-class (authors' code)",
            "control: backbone trained as long",
            "groups (one seed: sizes; several: counts)",
            "params backbone / HierNet",
            "wall per seed",
            "mistake severity, CIFAR-100 superclasses (backbone / slow)",
            COMMIT_HEADER,
        ]
        lines += [
            f"#### HierNet on CIFAR-100, {title}: ours (paper), accuracy % on the authors' 5k test half; "
            "mean +- std (sample std) over the seeds where there are several",
            "",
        ]
        lines += table(*without_blank_column(header, rows, COMMIT_HEADER))
        commands = [
            f"`{info['command']}`"
            for n in (HIERNET_TABLE2 if elu else HIERNET_TABLE1)
            for _, _, info in hiernet_seed_runs(results, n, elu)
        ]
        lines += ["", "Commands: " + ", ".join(commands) + ".", ""]
        if not elu and any(len(hiernet_seed_runs(results, n)) > 1 for n in (3, 9)):
            header = ["n", "seed", "backbone", "slow", "fast", "slow - backbone", "super-class", "control", "groups"]
            lines += [
                "Seeds of Table 1 (`--seed 1`, `--seed 2`; the groups are found again from each seed's backbone):",
                "",
            ]
            header += ["wall", COMMIT_HEADER]
            lines += table(*without_blank_column(header, hiernet_seed_rows(results), COMMIT_HEADER))
            lines += [""]
        number = 2 if elu else 1
        lines += figure_lines(
            results,
            (f"hiernet_table{number}.png", f"HierNet Table {number}: slow - backbone per n, ours beside the paper's"),
            *([] if elu else [("hiernet_cifar100_n9_cpm.png", "CPM of hiernet_cifar100_n9 in the tree's order")]),
        )
        if not elu:
            lines += hiernet_control_table(results)

    lines += [
        "### Latent hierarchy strings (`latent_string.py`), Table III: test accuracy %, ours then the paper's",
        "",
    ]
    body = []
    for run, data in (
        ("latent_string_cifar100", "CIFAR-100 (VGG16, L = 7)"),
        ("latent_string_mnist", "MNIST (LeNet, L = 4)"),
        ("latent_string_cifar10", "CIFAR-10 (JPEG q75 copy; VGG16, L = 4)"),
        ("latent_string_shapes", "shapes"),
    ):
        r, ri = load(run, results)
        if r is None:
            body.append([data, "not run yet", "", "", "", "", "", "", "", "", ""])
            continue
        t = r["throughput"]
        mode = t.get("test_time_mode")
        speed = (
            f"{t[f'{mode}_fc_images_per_s'] / 1e3:.0f}k / {t[f'{mode}_lh_images_per_s'] / 1e3:.0f}k "
            f"({t[f'{mode}_fc_batch1_ms']:.2f} / {t[f'{mode}_lh_batch1_ms']:.2f} ms)"
            if mode
            else f"{t['fc_images_per_s'] / 1e3:.0f}k / {t['lh_images_per_s'] / 1e3:.0f}k"
        )
        speed += f"; {t['test_time_reduction_pct']:+.1f}%"
        random = r["random_code"]["exact_match_acc"]
        body.append(
            [
                f"{data}: `{ri['command']}`",
                f2(r["fc_test_acc"]),
                f2(r["lh_test_acc"]),
                f2(r["reduced_fc_test_acc"]),
                f2(random),
                f"{r['lh_test_acc'] - random:+.2f}",
                str(len(r["duplicate_class_names"])),
                f"{r['params']['lh_classifier']:,} / {r['params']['fc_classifier']:,}",
                speed,
                wall(ri),
                severity_cell(r),
            ]
        )
        paper = r.get("paper")
        if paper:
            drop = paper.get("random_code_drop")
            body.append(
                [
                    "paper" + (", original CIFAR-10" if run == "latent_string_cifar10" else ""),
                    paper["fc_acc"],
                    paper["lh_acc"],
                    paper["reduced_fc_acc"],
                    "",
                    f"+{drop} (random is worse)" if drop else "",
                    "",
                    f"{paper['lh_params']} / {paper['fc_params']}",
                    f"{LATENT_PAPER_TEST_TIME[run]:+.1f}%",
                    "",
                    "",
                ]
            )
    lines += with_severity(
        [
            "data, command",
            "FC",
            "LH",
            "reduced FC",
            "LH random code",
            "LH learnt - random",
            "classes sharing a string",
            "LH / FC classifier params",
            "images/s FC / LH (batch-1 latency); test-time reduction",
            "wall",
        ],
        body,
    )
    lines += [
        "",
        "Each run's learnt prefix tree with class names is `prefix_tree.txt` in its folder, the L sweep "
        "(Fig. 8) `bits_sweep.tsv` and the hidden-size sweep (Fig. 7) `hidden_sweep.tsv`.",
        "",
    ]
    lines += figure_lines(
        results,
        ("latent_string_cifar100_bits.png", "CIFAR-100 accuracy vs string length (Fig. 8)"),
        ("latent_string_mnist_prefix_tree.png", "the learnt MNIST prefix tree"),
    )
    lines += lh_variant_tables(results)

    lines += [
        "### Merged coarse/fine networks (`merged_resnet.py`), top-1 error %, mean over runs",
        "",
    ]
    body = []
    cifar100 = merged_cifar100_run(results)
    for run in (cifar100 or MERGED_C100, "merged_resnet_cifar10", "merged_resnet_shapes"):
        m, info = load(run, results)
        if m is None:
            if "cifar100" in run:
                body.append([f"`{run}`: not run yet", *[""] * 6])
            continue
        points = m.get("best_alpha") or m["test_curve_minimum"]  # the latter: no validation split
        for arch, cost in m["costs"].items():
            cells = []
            for level in ("coarse", "fine"):
                b = points[f"{arch}/ensemble-1/{level}"]
                cells.append(f"{f2(b['test_err_alpha0_mean'])} -> {f2(b['test_err_mean'])} ({b['alpha']:.1f})")
            body.append(
                [
                    f"`{run}`",
                    arch,
                    f"{cost['parameters']:,}",
                    f"{cost['steady_train_seconds']:.0f}",
                    *cells,
                    severity_cell(m, within=arch),
                ]
            )
    header = [
        "run",
        "architecture",
        "params",
        "train s",
        "coarse: alpha 0 -> best (alpha)",
        "fine: alpha 0 -> best (alpha)",
    ]
    lines += with_severity(header, body)
    runs = [load(r, results)[1] for r in ("merged_resnet_cifar10", "merged_resnet_shapes")]
    commands = [info["command"] for info in runs if info is not None]
    lines += [
        "",
        "Commands: " + "; ".join(f"`{c}`" for c in commands) + ". Alpha is chosen on a validation "
        "split held out of the training set; these two are ResNet-56 (bottleneck), 12-15 epochs, 2 runs.",
    ]
    if cifar100:
        m, info = load(cifar100, results)
        lines.append(
            f"`{cifar100}`: `{info['command']}`, {m['runs']} of the paper's 5 runs (grown one run at a time, "
            "each step a job of tools/gpu_runs.py); the paper's protocol, every training image, so 'best' is the "
            "test curve's minimum, read off the curve, not a tuned result. DenseNet-BC-100 (Figure 4): not run yet."
        )
    else:
        lines.append(
            f"The paper's runs (ResNet-164 and DenseNet-BC-100 on CIFAR-100, 164 / 300 epochs, 5 runs) are not run "
            f"yet; ResNet-164 is queued in tools/gpu_runs.py as `{MERGED_C100}_runs1` to `_runs5`, one run a job."
        )
    lines.append("")
    for run in (cifar100, "merged_resnet_cifar10"):
        m, _ = load(run, results) if run else (None, None)
        if m is not None:
            lines += merged_alpha_tables(run, m)
    lines += figure_lines(
        results,
        ("merged_resnet_cifar100_resnet164_alpha.png", "CIFAR-100 error vs alpha (Fig. 3)"),
        ("merged_resnet_cifar10_alpha.png", "CIFAR-10 error vs alpha"),
    )

    lines += [
        "### Coarse network x VGG16 by outer product (`coarse_outer_product.py`), test accuracy %",
        "",
    ]
    body = []
    for run in ("coarse_outer_product_cifar100", "coarse_outer_product_cifar10", "coarse_outer_product_shapes"):
        m, info = load(run, results)
        if m is None:
            if run.endswith("cifar100"):
                body.append([f"`{run}`: not run yet", *[""] * 10])
            continue
        a = m["accuracy"]
        used = m["ete_coarse_usage"]["test"]["used"]
        body.append(
            [
                f"`{info['command']}`",
                f2(a["baseline"]["test"]),
                f2(a["main_ch"]["test"]),
                f2(a["main_cvc"]["test"]),
                f2(a["ete"]["test"]),
                f2(a["coarse_ch"]["test"]),
                f2(a["coarse_cvc"]["test"]),
                f"{used} of {m['coarse_k']}",
                " / ".join(f"{m['epoch_seconds_median'][k]:.1f}" for k in ("baseline", "main_ch", "ete")),
                wall(info),
                severity_cell(m),
            ]
        )
    paper = load("coarse_outer_product_cifar10", results)[0] or load("coarse_outer_product_shapes", results)[0]
    if paper:
        p = paper["paper_cifar100"]
        body.append(
            [
                "paper, CIFAR-100, K=10",
                p["baseline"]["test"],
                p["main_ch"]["test"],
                p["main_cvc"]["test"],
                p["ete"]["test"],
                p["coarse_ch"]["test"],
                p["coarse_cvc"]["test"],
                "1 of 10",
                "",
                "",
                "",
            ]
        )
    header = [
        "run",
        "baseline",
        "CH",
        "CVC",
        "ETE",
        "CH coarse net",
        "CVC coarse net",
        "ETE categories used",
        "epoch s (baseline / CH / ETE)",
        "wall",
    ]
    lines += with_severity(header, body)
    lines += [
        "",
        "Epoch seconds are medians (other jobs shared the GPU); every network's are in `metrics.json` "
        "(`epoch_seconds_median`); the CH categories found are in `coarse_categories.md`.",
        "",
    ]
    lines += outer_product_paper_tables(results)

    lines += [
        "### Hierarchical deep loss (`hdl_stack.py`), test error %",
        "",
    ]
    body = []
    # CIFAR-100: baseline and HDL at the paper's Table 3 setting are two runs (the baseline's fine error
    # goes beside each HDL row); the centre-loss sweep's pick is one more HDL run, ours.
    base_800, base_800_info = load("hdl_cifar100_baseline_800", results)
    for run, what in (
        ("hdl_cifar100_hdl_800", "800 epochs, the paper's Table 3 setting"),
        ("hdl_cifar100_sweep_pick_800", "800 epochs, ours: the centre-loss sweep's pick"),
    ):
        m, info = load(run, results)
        if m is None:
            body.append([f"`{run}` ({what}): not run yet"] + [""] * 6)
            continue
        levels = ", ".join(f"{k} {f2(v)}" for k, v in m["hdl"]["level_error"].items())
        body.append(
            [
                f"`{info['command']}` ({what})",
                f2(base_800["baseline"]["fine_error"]) if base_800 else "not run yet",
                f2(m["hdl"]["fine_error"]),
                levels,
                f2(m["hdl"]["violation_rate"]["with_fine"]),
                f"HDL {wall(info)}" + (f", baseline {wall(base_800_info)}" if base_800 else ""),
                severity_cell(m),
            ]
        )
    for run in ("hdl_stack_shapes", "hdl_stack_cifar10"):
        m, info = load(run, results)
        if m is None:
            continue
        levels = ", ".join(f"{k} {f2(v)}" for k, v in m["hdl"]["level_error"].items())
        body.append(
            [
                f"`{info['command']}`",
                f2(m["baseline"]["fine_error"]),
                f2(m["hdl"]["fine_error"]),
                levels,
                f2(m["hdl"]["violation_rate"]["with_fine"]),
                wall(info),
                severity_cell(m),
            ]
        )
    body += [
        ["paper, shapes (Table 4)", "", "", "fill 0, outline 0, shape 0", "", "", ""],
        ["paper, CIFAR-100 ResNet-18, 800 epochs (Table 3)", "35.70", "35.70", "12.23 / 11.43 / 1.20", "", "", ""],
    ]
    lines += with_severity(["command", "baseline fine", "HDL fine", "HDL level heads", "HDL violations", "wall"], body)
    lines += [""]
    lines += figure_lines(
        results,
        ("hdl_stack_cifar100_fine_error.png", "CIFAR-100 fine error per epoch, baseline vs HDL"),
        ("hdl_stack_cifar10_fine_error.png", "CIFAR-10 fine error per epoch, baseline vs HDL"),
    )
    sweep = results / "hdl_sweep_cifar100" / "sweep.md"
    lines += (
        ["CIFAR-100 centre-loss sweep on a tenth of train held out (`hdl_stack.py --sweep-table`):", ""]
        + sweep.read_text().strip().splitlines()[2:]  # the table, without its own title
        + [""]
        if sweep.exists()
        else ["CIFAR-100 centre-loss sweep (`hdl_sweep_cifar100_*` in tools/gpu_runs.py): not run yet.", ""]
    )

    bench = results / "bench.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        lines += [
            f"### Speed (`bench.py`), training images/s, {b['device']}, torch {b['torch']}",
            "",
            f"`{b['command']}`: {b['steps']} steps after {b['warmup']} warm-up steps, on {b['images']}.",
            "",
            row(["backbone", "batch", "usual loop", "ours", "model-only ceiling", "ours / usual", "ours / ceiling"]),
            row(["---"] * 7),
        ]
        for r in b["rows"]:
            lines.append(
                row(
                    [
                        r["backbone"],
                        r["batch"],
                        f"{r['usual']:.0f}",
                        f"{r['ours']:.0f}",
                        f"{r['ceiling']:.0f}",
                        f2(r["ours_over_usual"]),
                        f2(r["ours_over_ceiling"]),
                    ]
                )
            )
        lines.append("")
        lines += figure_lines(results, ("bench.png", "bench.py: usual loop, ours, model-only ceiling"))
    bench = results / "bench_hiernet.json"
    if bench.exists():
        b = json.loads(bench.read_text())
        backbone = next(r["images_per_s"] for r in b["rows"] if r["model"] == "backbone")
        lines += [
            f"HierNet training (`python bench.py --hiernet`, {b['device']}): n = {b['n']}, split {b['split']}, "
            f"{b['extra_blocks']} extra blocks, batch {b['batch']} of {b['image_size']}x{b['image_size']} images, "
            f"{b['steps']} steps; epoch = 50k images. The backbone alone: {backbone:.0f} images/s.",
            "",
            row(
                [
                    "groups",
                    "per-branch images/s",
                    "batched images/s",
                    "batched / per-branch",
                    "epoch per-branch -> batched",
                ]
            ),
            row(["---"] * 5),
        ]
        for r in b["rows"]:
            if r["model"] == "hiernet":
                lines.append(
                    row(
                        [
                            r["groups"],
                            f"{r['per_branch']:.0f}",
                            f"{r['batched']:.0f}",
                            f2(r["batched_over_per_branch"]),
                            f"{r['per_branch_epoch_s']:.1f} s -> {r['batched_epoch_s']:.1f} s",
                        ]
                    )
                )
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--write", default=None, metavar="README", help="replace the section between the markers")
    a = p.parse_args(argv)
    text = section(Path(a.results))
    if not a.write:
        print(text)
        return
    readme = Path(a.write)
    old = readme.read_text()
    if START not in old or END not in old:
        sys.exit(f"error: {readme} has no results markers ({START} ... {END})")
    head, rest = old.split(START, 1)
    readme.write_text(head + text + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
