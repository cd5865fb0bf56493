"""Figures of the runs in results/ (or of one run directory), as PNGs.

    python tools/plots.py                  # every run in results/ -> results/figures/
    python tools/plots.py RUN_DIR ...      # one run's figures -> RUN_DIR/figures/ (or --out DIR)

Figures, each beside the paper's numbers where the paper gives them:

- HierNet: the confusion probability matrix of a run, classes in the tree's order with the group
  borders; Tables 1-2 as slow - backbone per n, ours (seed bars) beside the paper's, with the
  training-length control (results mode only: it reads several runs); the controls: HierNet on the
  CPM tree and on a random tree of the same group sizes, and the backbone trained as long; the readings of
  the n = 3 backbone's gap to the paper's (option-B shortcuts, fp32, the authors' schedule) beside our seeds.
- Merged ResNets: top-1 error vs alpha per architecture, coarse and fine, mean and a +-1 std band
  over the runs, the paper's optimum (alpha near 1, Figs. 3-4) marked.
- Coarse network x VGG16: training-mode and validation accuracy per epoch of each table's network,
  the paper's figures (Tables I, III-VII) at the epoch each reports.
- Latent strings: accuracy vs the string length L (Fig. 8) and vs the LSTM size (Fig. 7), with the
  paper's Table III point; the learnt prefix tree.
- HDL: fine error per epoch, baseline vs HDL; the level errors beside the majority-category ones;
  the centre-loss sweep's validation curves, cell by cell, beside its baseline (results mode only).
- Speed: bench.py's usual loop / ours / model-only ceiling.

A figure whose data a run does not have (a sweep not run, an older run without a field) is skipped
with one line saying why; nothing is drawn from numbers the run did not record.

matplotlib is a development dependency of tools/ only; the five scripts never import it.
"""

import argparse
import csv
import io
import json
import math
import sys
from pathlib import Path

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display: works on a headless machine and in CI
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator
except ImportError:
    plt = None

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_table  # the paper tables of the README's results section

ROOT = Path(__file__).resolve().parent.parent
DPI = 100  # committed PNGs: small in bytes, still legible

NO_MATPLOTLIB = (
    "error: tools/plots.py needs matplotlib (a development dependency of tools/ only): pip install matplotlib"
)

# Paper, Table I: the LSTM size of the LH classifier per dataset, where Table III's accuracy was measured.
LATENT_TABLE1_HIDDEN = {"mnist": 10, "cifar10": 20, "cifar100": 40}

OURS, PAPER, CONTROL, OTHER = "tab:blue", "tab:red", "tab:gray", "tab:green"


class Skip(Exception):
    """A figure the run has no data for; the message says what is missing."""


def read_json(path):
    """A run's JSON file; a damaged one stops with one line naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        sys.exit(f"error: {path}: unreadable JSON ({e})")


def need(path):
    if not Path(path).is_file():
        raise Skip(f"no {Path(path).name} in {Path(path).parent}")
    return Path(path)


def save(fig, out):
    """The figure as a PNG of at most 256 colours: the figures' flat colours and the colour maps' steps
    survive, in a third of the bytes of matplotlib's RGBA file (the figures travel with every device call)."""
    from PIL import Image  # matplotlib's own dependency

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    rgb = Image.open(buffer).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    rgb.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    return out


# ---------------------------------------------------------------- HierNet


def tree_leaves(node):
    """Classes of a (nested) tree.json group in order."""
    if all(isinstance(c, int) for c in node):
        return list(node)
    return [c for child in node for c in tree_leaves(child)]


def group_borders(tree, depth=0, start=0):
    """[(position, depth)] of the borders between groups (depth 0: top-level groups), in class order."""
    borders, position = [], start
    for i, child in enumerate(tree):
        if i:
            borders.append((position, depth))
        if not all(isinstance(c, int) for c in child):
            borders += group_borders(child, depth + 1, position)
        position += len(tree_leaves(child))
    return borders


def cpm_figsize(n_classes):
    """Inches: about 0.1 inch per class (names in 6 pt) plus room for the labels and the colour bar."""
    side = max(5.5, 0.1 * n_classes + 2.0)
    return side + 1.0, side


def plot_hiernet_cpm(run_dir, out):
    cpm = np.load(need(run_dir / "cpm.npy"), allow_pickle=False)
    tree_info = read_json(need(run_dir / "tree.json"))
    names, tree = tree_info["class_names"], tree_info["tree"]
    order = tree_leaves(tree)
    if sorted(order) != list(range(len(cpm))):
        raise Skip(f"{run_dir / 'tree.json'}: its classes are not those of cpm.npy ({len(cpm)})")
    ordered = cpm[np.ix_(order, order)]
    n = len(order)
    fig, ax = plt.subplots(figsize=cpm_figsize(n), layout="constrained")
    # Rows are average softmax vectors, mostly on the diagonal: a log scale shows the confusions.
    floor = 1e-4
    image = ax.imshow(np.maximum(ordered, floor), cmap="viridis", norm=LogNorm(vmin=floor, vmax=1.0))
    font = 6 if n > 30 else 9
    ax.set_xticks(range(n), [names[c] for c in order], rotation=90, fontsize=font)
    ax.set_yticks(range(n), [names[c] for c in order], fontsize=font)
    for position, depth in group_borders(tree):
        width, style = (1.6, "-") if depth == 0 else (0.8, "--")
        ax.axhline(position - 0.5, color="red", lw=width, ls=style)
        ax.axvline(position - 0.5, color="red", lw=width, ls=style)
    ax.set_xlabel("predicted class (average softmax)")
    ax.set_ylabel("true class")
    sizes = " / ".join(str(len(tree_leaves(g))) for g in tree)
    ax.set_title(
        f"{run_dir.name}: confusion probability matrix\nclasses in the tree's order, {len(tree)} groups ({sizes}), "
        "borders in red",
        fontsize=10,
    )
    fig.colorbar(image, ax=ax, shrink=0.6, label="probability (log scale)")
    return save(fig, out)


def hiernet_table_runs(results, n, elu, variant=""):
    """[metrics] of HierNet on CIFAR-100 at n (a variant: its name's suffix, e.g. _randomtree): seed 0 is the plain
    run, then _seed1, _seed2..."""
    base = f"hiernet_cifar100_n{n}" + ("_elu" if elu else "") + variant
    found = []
    for seed in range(10):
        metrics = results / (base + (f"_seed{seed}" if seed else "")) / "metrics.json"
        if metrics.is_file():
            found.append(read_json(metrics))
    return found


def control_gains(m):
    """{label: accuracy - backbone} of a run's controls: the training-length control (`control_acc`) and
    any other `*control*_acc` a newer hiernet.py records."""
    gains = {}
    for key, value in m.items():
        if "control" in key and key.endswith("_acc") and isinstance(value, (int, float)):
            label = "control: backbone trained as long" if key == "control_acc" else key
            gains[label] = value - m["backbone_acc"]
    return gains


def plot_hiernet_table(results, out, elu=False):
    paper = results_table.HIERNET_TABLE2 if elu else results_table.HIERNET_TABLE1
    runs = {n: hiernet_table_runs(results, n, elu) for n in paper}
    if not any(runs.values()):
        raise Skip(f"no hiernet_cifar100_n*{'_elu' if elu else ''} run in {results}")
    control_labels = sorted({label for ms in runs.values() for m in ms for label in control_gains(m)})
    series = ["ours: slow - backbone", "paper: slow - backbone", *control_labels]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    xs = np.arange(len(paper))
    colours = [OURS, PAPER, CONTROL, OTHER, "tab:purple"]
    in_legend = set()
    for k, label in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        for i, (n, (_, p_backbone, p_slow, _)) in enumerate(paper.items()):
            if label.startswith("paper"):
                values = [p_slow - p_backbone]
            elif label.startswith("ours"):
                values = [m["slow_acc"] - m["backbone_acc"] for m in runs[n]]
            else:
                values = [control_gains(m)[label] for m in runs[n] if label in control_gains(m)]
            if not values:
                continue
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            ax.bar(
                xs[i] + offset,
                mean,
                width,
                color=colours[k % len(colours)],
                yerr=std if len(values) > 1 else None,
                capsize=3,
                label=None if label in in_legend else label,
            )
            in_legend.add(label)
            if len(values) > 1:  # every seed, so two seeds read as two seeds
                ax.plot([xs[i] + offset] * len(values), values, "k.", ms=4)
            ax.annotate(f"{mean:+.2f}", (xs[i] + offset, mean + std), ha="center", va="bottom", fontsize=7)
    for i, n in enumerate(paper):
        seeds = len(runs[n])
        ax.annotate(
            f"{seeds} seed{'s' if seeds != 1 else ''}" if seeds else "not run",
            (xs[i], 0),
            xycoords=ax.get_xaxis_transform(),  # below the axis whatever the y range
            xytext=(0, -28),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color="dimgray",
        )
    ax.set_xticks(xs, [f"n = {n} ({layers} layers)" for n, (layers, *_) in paper.items()])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("accuracy gain over the backbone, points")
    ax.set_title(
        f"HierNet on CIFAR-100, Table {2 if elu else 1} ({'ELU ' if elu else ''}ResNet), "
        "gains over the backbone\nours: mean +-1 std over seeds (dots: seeds); control: the backbone trained as long",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(top=ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    return save(fig, out)


def plot_hiernet_controls(results, out):
    """Where HierNet's gain comes from, per n on CIFAR-100 (ResNet): accuracy - backbone of HierNet on the
    CPM tree (every seed), on the random tree (--tree-from random) and of the backbone trained as long
    (--control, every seed that has it); bars are means, dots the runs, whiskers +-1 std where several."""
    gains = {}  # n -> [per series: the runs' accuracy - backbone]
    for n in results_table.HIERNET_TABLE1:
        runs = hiernet_table_runs(results, n, False)
        control = [m["control_acc"] - m["backbone_acc"] for m in runs if "control_acc" in m]
        random = random_tree_gains(results, n)
        if control or random:
            gains[n] = ([m["slow_acc"] - m["backbone_acc"] for m in runs], random, control)
    if not gains:
        raise Skip(f"no hiernet_cifar100_n*_randomtree run or --control run in {results}")
    ns = list(gains)
    series = (
        ("HierNet, CPM tree (the paper's)", OURS),
        ("HierNet, random tree (same group sizes)", OTHER),
        ("backbone trained as long (--control)", CONTROL),
    )
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for k, (label, colour) in enumerate(series):
        for i, n in enumerate(ns):
            values = gains[n][k]
            if not values:
                continue
            x = i + (k - (len(series) - 1) / 2) * width
            mean = float(np.mean(values))
            std = float(np.std(values, ddof=1)) if len(values) > 1 else None
            ax.bar(x, mean, width, color=colour, yerr=std, capsize=3, label=label if i == 0 else None)
            ax.plot([x] * len(values), values, "k.", ms=4)
            tip = max(values + [mean + (std or 0)]) if mean >= 0 else min(values + [mean - (std or 0)])
            ax.annotate(
                f"{mean:+.2f} ({len(values)})",
                (x, tip),
                xytext=(0, 3 if mean >= 0 else -3),
                textcoords="offset points",
                ha="center",
                va="bottom" if mean >= 0 else "top",
                fontsize=7,
            )
    ax.set_xticks(range(len(ns)), [f"n = {n}" for n in ns])
    ax.set_xlim(-0.6, len(ns) - 0.4)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("accuracy - its own backbone, points")
    ax.set_title(
        "HierNet on CIFAR-100: the CPM tree, a random tree of the same sizes,\nand the backbone trained as long "
        "(bars: mean; dots: runs; (k): runs)",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    low, high = ax.get_ylim()
    ax.set_ylim(low - 0.5, high + 0.35 * (high - low))  # room for the labels and the legend
    return save(fig, out)


def plot_hiernet_backbone_readings(results, out):
    """HierNet n = 3 on CIFAR-100: backbone and slow accuracy of the paper's setting (every seed: mean bar,
    dots the runs) and of each reading of the backbone gap run so far (one seed each), the paper's
    Table 1 figures as lines."""
    seeds = hiernet_table_runs(results, 3, False)
    readings = [
        (label, runs)
        for suffix, _, label in results_table.HIERNET_BACKBONE_READINGS
        if (runs := hiernet_table_runs(results, 3, False, suffix))
    ]
    if not seeds or not readings:
        raise Skip(f"no hiernet_cifar100_n3 run beside a reading (_shortcutB, _fp32, ...) in {results}")
    _, paper_backbone, paper_slow, _ = results_table.HIERNET_TABLE1[3]
    groups = [(f"ours ({len(seeds)} seeds)", seeds), *readings]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    width = 0.38
    for k, (key, colour, paper) in enumerate(
        (("backbone_acc", CONTROL, paper_backbone), ("slow_acc", OURS, paper_slow))
    ):
        for i, (label, runs) in enumerate(groups):
            values = [m[key] for m in runs]
            x = i + (k - 0.5) * width
            ax.bar(
                x,
                np.mean(values),
                width,
                color=colour,
                label=("backbone" if k == 0 else "HierNet slow") if i == 0 else None,
            )
            ax.plot([x] * len(values), values, "k.", ms=4)
            ax.annotate(
                f"{np.mean(values):.2f}",
                (x, max(values)),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=7,
            )
        ax.axhline(paper, color=colour, ls="--", lw=1, label=f"paper, {'backbone' if k == 0 else 'slow'} {paper:.2f}")
    ax.set_xticks(range(len(groups)), [label for label, _ in groups], fontsize=8)
    low = min(m[key] for _, runs in groups for m in runs for key in ("backbone_acc", "slow_acc"))
    ax.set_ylim(min(low, paper_backbone) - 2, None)
    ax.set_ylabel("test-half accuracy %")
    ax.set_title(
        "HierNet n = 3, CIFAR-100: readings of our backbone's gap to the paper's (each reading one seed)", fontsize=9
    )
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    return save(fig, out)


def random_tree_gains(results, n):
    """accuracy - backbone of the random-tree runs at n (seed 0 the plain run, then _seedK)."""
    return [m["slow_acc"] - m["backbone_acc"] for m in hiernet_table_runs(results, n, False, "_randomtree")]


# ---------------------------------------------------------------- merged ResNets


def plot_merged_alpha(run_dir, out):
    m = read_json(need(run_dir / "metrics.json"))
    if "curves" not in m:
        raise Skip(f"{run_dir / 'metrics.json'} has no alpha curves")
    alphas = np.asarray(m["alphas"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained")
    levels = (("coarse", f"coarse ({m['n_coarse']} classes)"), ("fine", f"fine ({m['n_fine']} classes)"))
    for ax, (level, title) in zip(axes, levels):
        for key, curve in m["curves"].items():
            architecture, ensemble = key.split("/")
            if ensemble != "ensemble-1":  # Fig. 4's view; ensembles are Fig. 3's extra panels
                continue
            errors = np.asarray(curve["test"][level])  # runs x alphas
            mean = errors.mean(0)
            std = errors.std(0, ddof=1) if len(errors) > 1 else np.zeros_like(mean)
            (line,) = ax.plot(alphas, mean, label=f"{architecture} ({len(errors)} runs)")
            # An error is never negative: the band stops at 0 (shapes' near-zero errors).
            ax.fill_between(alphas, np.maximum(mean - std, 0), mean + std, color=line.get_color(), alpha=0.2, lw=0)
            best = m.get("best_alpha", {}).get(f"{key}/{level}")
            if best:  # our alpha, chosen on the validation split
                ax.plot(best["alpha"], best["test_err_mean"], "o", color=line.get_color(), ms=5)
        ax.axvline(
            results_table.MERGED_PAPER_OPTIMUM_ALPHA, color=PAPER, ls="--", lw=1, label="paper: optimum near alpha = 1"
        )
        ax.set_xlabel("alpha (0: none, 1: full adaptation, 2: coarse from fine)")
        ax.set_ylabel("test top-1 error %")
        ax.set_title(title, fontsize=10)
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"{run_dir.name}: error vs alpha, mean +-1 std over runs; dots: alpha chosen on validation",
        fontsize=10,
    )
    return save(fig, out)


# ---------------------------------------------------------------- coarse network x VGG16

# The networks of Tables I and III-VII, in the order they train (the pretrain / recovery stages only build CH).
OUTER_PRODUCT_STAGES = (
    ("baseline", "I, VGG16 baseline"),
    ("coarse_ch", "III, CH coarse"),
    ("main_ch", "IV, CH outer product"),
    ("coarse_cvc", "V, CVC coarse"),
    ("main_cvc", "VI, CVC outer product"),
    ("ete", "VII, ETE"),
)


def plot_outer_product_curves(run_dir, out):
    """Training-mode and validation accuracy per epoch of each table's network; crosses: the paper's
    figures at the epoch its table reports."""
    records = results_table.read_jsonl(need(run_dir / "metrics.jsonl"))
    stages = [(s, label) for s, label in OUTER_PRODUCT_STAGES if any(r.get("stage") == s for r in records)]
    if not stages:
        raise Skip(f"{run_dir / 'metrics.jsonl'} has no epochs of the tables' networks")
    paper = read_json(need(run_dir / "args.json")).get("dataset") == "cifar100"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained", sharey=True)
    for (stage, label), colour in zip(stages, plt.get_cmap("tab10").colors):
        epochs = sorted((r["epoch"], r["train_acc"], r["val_acc"]) for r in records if r.get("stage") == stage)
        x, train, val = zip(*epochs)
        for ax, y, index in ((axes[0], train, 0), (axes[1], val, 1)):
            ax.plot(x, y, color=colour, lw=1.2, label=label)
            reported = results_table.OUTER_PRODUCT_PAPER[stage][index] if paper else None
            if reported is not None:
                ax.plot(results_table.OUTER_PRODUCT_PAPER_EPOCHS[stage], reported, "x", color=colour, ms=8, mew=2)
    axes[0].set_title("train (training mode, running over the epoch)", fontsize=10)
    axes[1].set_title("validation", fontsize=10)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("accuracy %")
    axes[1].legend(fontsize=8, loc="lower right")
    crosses = "; crosses: the paper's (Tables I, III-VII)" if paper else ""
    fig.suptitle(f"{run_dir.name}: accuracy per epoch of each table's network{crosses}", fontsize=10)
    return save(fig, out)


# ---------------------------------------------------------------- latent strings


def read_tsv(path):
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]


def latent_paper_point(m):
    """The paper's Table III LH accuracy for this dataset, or None (shapes, another hierarchy)."""
    return results_table.latent_paper(m).get("lh_acc")


def plot_latent_sweep(run_dir, out, kind):
    """kind 'bits': accuracy vs L (Fig. 8); 'hidden': accuracy vs the LSTM size (Fig. 7)."""
    name = "bits_sweep.tsv" if kind == "bits" else "hidden_sweep.tsv"
    rows = read_tsv(need(run_dir / name))
    if not rows:
        raise Skip(f"{run_dir / name} is empty")
    m = read_json(need(run_dir / "metrics.json"))
    x = [r[kind] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.plot(x, [r["exact_match_acc"] for r in rows], "o-", color=OURS, label="ours, LH exact match (paper's rule)")
    ax.plot(x, [r["lookup_acc"] for r in rows], "s--", color=OURS, alpha=0.5, label="ours, LH lookup")
    ax.axhline(m["fc_test_acc"], color=CONTROL, ls=":", label=f"ours, FC classifier {m['fc_test_acc']:.2f}")
    paper_acc = latent_paper_point(m)
    default_bits = math.ceil(math.log2(m["num_classes"]))
    if kind == "bits":
        ax.axvline(default_bits, color=PAPER, ls="--", lw=1, label=f"paper: best at L = ceil(log2 C) = {default_bits}")
        if paper_acc is not None:
            ax.plot(default_bits, paper_acc, "*", color=PAPER, ms=12, label=f"paper, Table III: {paper_acc}")
        ax.set_xlabel("string length L (bits)")
        ax.set_xticks(x)
        title = "accuracy vs string length (Fig. 8)"
    else:
        hidden = LATENT_TABLE1_HIDDEN.get(m["dataset"])
        if paper_acc is not None and hidden is not None:
            ax.plot(hidden, paper_acc, "*", color=PAPER, ms=12, label=f"paper, Table III at Table I's {hidden}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.set_xlabel("LSTM hidden size (every layer)")
        title = "accuracy vs LSTM size (Fig. 7)"
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{run_dir.name}: {title}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, out)


def prefix_tree_layout(codes):
    """Leaves (name, code) in code order, and the edges [(parent prefix, child prefix)] of the prefix
    tree of the strings; classes that share a string (duplicates) hang side by side from one node."""
    leaves = sorted(codes.items(), key=lambda item: (item[1], item[0]))
    prefixes = {code[:d] for _, code in leaves for d in range(len(code) + 1)}
    edges = sorted((p[:-1], p) for p in prefixes if p)
    return leaves, edges


def prefix_tree_figsize(n_leaves):
    return 8.0, max(3.0, 0.14 * n_leaves + 1.2)


def plot_latent_prefix_tree(run_dir, out):
    codes = read_json(need(run_dir / "class_codes.json"))["codes"]
    leaves, edges = prefix_tree_layout(codes)
    bits = max(len(code) for code in codes.values())
    # A leaf row per class; an inner node sits at the mean row of the classes under it.
    rows = {}
    for row, (_, code) in enumerate(leaves):
        rows.setdefault(code, []).append(row)
    y = {}
    for prefix in sorted({p for e in edges for p in e}, key=len, reverse=True):
        under = [r for code, rs in rows.items() if code.startswith(prefix) for r in rs]
        y[prefix] = float(np.mean(under))
    fig, ax = plt.subplots(figsize=prefix_tree_figsize(len(leaves)), layout="constrained")
    for parent, child in edges:  # elbow connectors, as a dendrogram
        ax.plot([len(parent), len(parent), len(child)], [y[parent], y[child], y[child]], color="black", lw=0.8)
    font = 6 if len(leaves) > 30 else 9
    for row, (name, code) in enumerate(leaves):
        ax.plot([len(code), bits + 0.15], [y[code], row], color="lightgray", lw=0.5)
        ax.text(bits + 0.2, row, f"{code}  {name}", va="center", fontsize=font, family="monospace")
    ax.set_xlim(-0.2, bits + 2.5)
    ax.set_ylim(len(leaves) - 0.5, -0.5)
    ax.set_xticks(range(bits + 1))
    ax.set_yticks([])
    ax.set_xlabel("prefix length (bits); upper branch 0, lower 1")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    duplicates = len(leaves) - len(rows)
    ax.set_title(
        f"{run_dir.name}: learnt prefix tree, {len(leaves)} classes on {len(rows)} strings of {bits} bits"
        + (f" ({duplicates} classes share a string)" if duplicates else ""),
        fontsize=10,
    )
    return save(fig, out)


# ---------------------------------------------------------------- HDL


def plot_hdl_fine_error(run_dir, out):
    records = results_table.read_jsonl(need(run_dir / "metrics.jsonl"))
    m = read_json(need(run_dir / "metrics.json"))
    stages = [s for s in ("baseline", "hdl") if any(r.get("stage") == s for r in records)]
    if not stages:
        raise Skip(f"{run_dir / 'metrics.jsonl'} has no baseline or hdl epochs")
    # The validation curve when the run held a split out; otherwise the training error (all it logged).
    held_out = all("val_fine_acc" in r for r in records if r.get("stage") in stages)
    key, split = ("val_fine_acc", "validation") if held_out else ("train_acc", "train")
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for stage, colour in zip(stages, (CONTROL, OURS)):
        epochs = sorted((r["epoch"], 100.0 - r[key]) for r in records if r.get("stage") == stage)
        ax.plot(*zip(*epochs), color=colour, label=f"{stage}, {split} (per epoch)")
        final = m.get(stage, {}).get("fine_error")
        if final is not None:
            ax.plot(
                epochs[-1][0],
                final,
                "o",
                color=colour,
                ms=7,
                label=f"{stage}, {m.get('eval_split', 'test')}: {final:.2f}",
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("fine error %")
    ax.set_title(
        f"{run_dir.name}: fine error per epoch, {' vs '.join({'hdl': 'HDL'}.get(s, s) for s in stages)}", fontsize=10
    )
    ax.legend(fontsize=8)
    return save(fig, out)


# The centre-loss sweep's line style per centre update and features (the paper's, per-epoch raw: solid).
SWEEP_STYLES = {("epoch", "raw"): "-", ("epoch", "normalized"): "--", ("wen", "raw"): ":", ("sgd", "raw"): "-."}


def validation_error_curve(run_dir):
    """[(epoch, validation fine error %)] of an hdl_stack.py --val-fraction run; [] without its metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    records = results_table.read_jsonl(path) if path.is_file() else []
    return sorted((r["epoch"], 100.0 - r["val_fine_acc"]) for r in records if "val_fine_acc" in r)


def plot_hdl_sweep(sweep_dir, out):
    """Validation fine error per epoch of every cell of the centre-loss sweep (a folder of runs, one per
    cell, as --collect lands them): the paper's centre update and features (per-epoch, raw) on the left,
    the other updates and features on the right, the baseline in black on both, cells coloured by lambda0."""
    cells = []
    for run in sorted(d for d in Path(sweep_dir).iterdir() if d.is_dir()) if Path(sweep_dir).is_dir() else []:
        if (run / "args.json").is_file() and (run / "metrics.jsonl").is_file():
            if curve := validation_error_curve(run):
                cells.append((read_json(run / "args.json"), curve))
    if not cells:
        raise Skip(f"no sweep cell with a validation curve in {sweep_dir}")
    lambdas = sorted({a["lambda_center"] for a, _ in cells if a["method"] == "hdl"})
    colour = dict(zip(lambdas, plt.cm.viridis(np.linspace(0, 0.9, max(len(lambdas), 1)))))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), layout="constrained", sharey=True)
    titles = ("per-epoch centres, raw features (the paper's)", "other centre updates and features")
    for paper_variant, ax, title in zip((True, False), axes, titles):
        for args, curve in sorted(cells, key=lambda c: (c[0]["method"] != "baseline", -c[0]["lambda_center"])):
            if args["method"] == "baseline":
                ax.plot(*zip(*curve), color="black", lw=2, label=f"baseline ({curve[-1][1]:.1f})")
                continue
            variant = (args["center_update"], args["center_features"])
            if (variant == ("epoch", "raw")) != paper_variant:
                continue
            label = f"{'/'.join(variant)} {args['lambda_center']:g} ({curve[-1][1]:.1f})"
            ax.plot(*zip(*curve), SWEEP_STYLES.get(variant, "-"), color=colour[args["lambda_center"]], label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, title="update/features lambda0 (last epoch)", title_fontsize=7)
    axes[0].set_ylabel("validation fine error %")
    fig.suptitle(f"{Path(sweep_dir).name}: HDL's centre-loss sweep", fontsize=10)
    return save(fig, out)


def plot_hdl_stem(results, out):
    """Which ResNet-18 stem Table 3 trained: validation fine error per epoch of the baseline and of HDL at the
    paper's setting, 7x7 stem (the sweep's two cells) against 3x3 (the stem cells), results_table.STEM_CELLS,
    with Table 3's ResNet-18 error as a line."""
    curves = []
    for stem, runs in results_table.STEM_CELLS.items():
        for method, run in zip(("baseline", "hdl"), runs):
            if curve := validation_error_curve(results / run):
                curves.append((stem, method, curve))
    if not curves:
        raise Skip(
            f"no stem cell ({', '.join(r for runs in results_table.STEM_CELLS.values() for r in runs)}) in {results}"
        )
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for stem, method, curve in curves:
        style = "-" if stem == "cifar" else "--"
        label = f"{results_table.STEM_NAMES[stem]} stem, {method} ({curve[-1][1]:.1f})"
        ax.plot(*zip(*curve), style, color=CONTROL if method == "baseline" else OURS, label=label)
    paper = results_table.HDL_PAPER_TABLE3["resnet18"][0]
    ax.axhline(paper, color="grey", lw=1, ls=":", label=f"Table 3 ResNet-18, 800 epochs, test ({paper:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation fine error %")
    ax.set_title("HDL on CIFAR-100: which ResNet-18 stem (40 epochs, a tenth held out)", fontsize=10)
    ax.legend(fontsize=8, title="stem, method (last epoch)", title_fontsize=8)
    return save(fig, out)


def plot_hdl_sweep_3x3(results, out):
    """The centre-loss sweep on the 3x3 stem (results_table.PICK_SWEEP: the stem cells and the variants beside
    them), drawn as the 7x7 sweep once a variant beyond the two stem cells has its curve."""
    sweep = results / results_table.PICK_SWEEP
    stem_cells = {Path(run).name for run in results_table.STEM_CELLS["cifar"]}
    if not {p.parent.name for p in sweep.glob("*/metrics.jsonl")} - stem_cells:
        raise Skip(f"no cell of the 3x3 sweep beyond the stem cells in {sweep}")
    return plot_hdl_sweep(sweep, out)


def plot_hdl_levels(run_dir, out):
    m = read_json(need(run_dir / "metrics.json"))
    if "hdl" not in m or "level_error" not in m["hdl"]:
        raise Skip(f"{run_dir / 'metrics.json'} has no HDL level errors (run without --method hdl?)")
    levels = [(level["level"], level["name"], level["num_classes"]) for level in m["levels"]]
    names = [name for _, name, _ in levels]
    args = read_json(run_dir / "args.json") if (run_dir / "args.json").is_file() else {}
    paper = results_table.hdl_paper_level_errors(m, args)
    series = {
        "HDL level heads": [m["hdl"]["level_error"].get(n) for n in names],
        "HDL, summed fine probabilities": [m["hdl"].get("summed_fine_level_error", {}).get(n) for n in names],
        "baseline, summed fine probabilities": [
            m.get("baseline", {}).get("summed_fine_level_error", {}).get(n) for n in names
        ],
    }
    majority = m.get("majority_error")
    if majority:
        series["majority category (largest in train)"] = [majority.get(n) for n in names]
    if paper:
        series["paper"] = [paper.get(n) for n in names]
    series = {label: values for label, values in series.items() if any(v is not None for v in values)}
    colours = {"paper": PAPER, "majority category (largest in train)": CONTROL}
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    xs = np.arange(len(names))
    for k, (label, values) in enumerate(series.items()):
        offset = (k - (len(series) - 1) / 2) * width
        for i, value in enumerate(values):
            if value is None:
                continue
            ax.bar(xs[i] + offset, value, width, color=colours.get(label, f"C{k}"), label=label if i == 0 else None)
            ax.annotate(f"{value:.2f}", (xs[i] + offset, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, [f"{level} {name}\n({classes} classes)" for level, name, classes in levels])
    ax.set_ylabel(f"{m.get('eval_split', 'test')} error %")
    title = f"{run_dir.name}: error per level"
    if not majority:
        title += "\n(majority-category errors not recorded: the run predates them)"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    return save(fig, out)


# ---------------------------------------------------------------- speed


def plot_bench(bench_json, out):
    b = read_json(need(bench_json))
    rows = b.get("rows") or []
    if not rows or not all(k in rows[0] for k in ("usual", "ours", "ceiling")):
        raise Skip(f"{bench_json} has no usual / ours / ceiling rows")
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    xs = np.arange(len(rows))
    width = 0.27
    for k, (key, label, colour) in enumerate(
        (
            ("usual", "usual loop (DataLoader, 8 workers, eager fp32)", CONTROL),
            ("ours", "ours", OURS),
            ("ceiling", "model-only ceiling", OTHER),
        )
    ):
        values = [r[key] for r in rows]
        ax.bar(xs + (k - 1) * width, values, width, color=colour, label=label)
        for x, r in zip(xs, rows):
            if key != "usual":
                ax.annotate(
                    f"{r[key] / r['usual']:.1f}x", (x + (k - 1) * width, r[key]), ha="center", va="bottom", fontsize=7
                )
    ax.set_xticks(xs, [f"{r['backbone']}, batch {r['batch']}" for r in rows])
    ax.set_ylabel("training images/s")
    ax.set_title(f"bench.py: {b.get('device', '')}, torch {b.get('torch', '')} (x: over the usual loop)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.margins(y=0.12)
    return save(fig, out)


# ---------------------------------------------------------------- runs -> figures


SCRIPTS = ("hiernet", "merged_resnet", "latent_string", "hdl_stack", "coarse_outer_product")


def run_script(run_dir):
    """The script that wrote a run (args.json's "script"; runs older than that field are named after their
    script, hiernet_cifar100_n9), or None for a folder that is not a run."""
    args = run_dir / "args.json"
    if not (args.is_file() and (run_dir / "metrics.json").is_file()):
        return None
    args = read_json(args)
    names = (run_dir.name, Path(args.get("out_dir") or "").name)  # the folder, or the one it was written to
    return args.get("script") or next((s for s in SCRIPTS for name in names if name.startswith(s)), None)


def run_figures(run_dir):
    """[(file name, draw(out))] of one run, by the script that wrote it."""
    script, name = run_script(run_dir), run_dir.name
    if script == "hiernet":
        return [(f"{name}_cpm.png", lambda out: plot_hiernet_cpm(run_dir, out))]
    if script == "merged_resnet":
        return [(f"{name}_alpha.png", lambda out: plot_merged_alpha(run_dir, out))]
    if script == "coarse_outer_product":
        return [(f"{name}_curves.png", lambda out: plot_outer_product_curves(run_dir, out))]
    if script == "latent_string":
        return [
            (f"{name}_bits.png", lambda out: plot_latent_sweep(run_dir, out, "bits")),
            (f"{name}_hidden.png", lambda out: plot_latent_sweep(run_dir, out, "hidden")),
            (f"{name}_prefix_tree.png", lambda out: plot_latent_prefix_tree(run_dir, out)),
        ]
    if script == "hdl_stack":
        return [
            (f"{name}_fine_error.png", lambda out: plot_hdl_fine_error(run_dir, out)),
            (f"{name}_levels.png", lambda out: plot_hdl_levels(run_dir, out)),
        ]
    return []


def results_figures(results):
    """[(file name, draw(out))] of a results folder: every run directly in it, Tables 1-2, bench.json."""
    figures = [
        ("hiernet_table1.png", lambda out: plot_hiernet_table(results, out, elu=False)),
        ("hiernet_table2.png", lambda out: plot_hiernet_table(results, out, elu=True)),
        ("hiernet_controls.png", lambda out: plot_hiernet_controls(results, out)),
        ("hiernet_backbone_readings.png", lambda out: plot_hiernet_backbone_readings(results, out)),
        ("bench.png", lambda out: plot_bench(results / "bench.json", out)),
        ("hdl_sweep_cifar100.png", lambda out: plot_hdl_sweep(results / "hdl_sweep_cifar100", out)),
        ("hdl_stem_cifar100.png", lambda out: plot_hdl_stem(results, out)),
        ("hdl_sweep_3x3_cifar100.png", lambda out: plot_hdl_sweep_3x3(results, out)),
    ]
    for run_dir in sorted(d for d in results.iterdir() if d.is_dir()):
        figures += run_figures(run_dir)
    return figures


def draw(figures, out_dir):
    """Draw each figure; a missing one is one line. Returns (written paths, skipped lines)."""
    written, skipped = [], []
    for name, plot in figures:
        try:
            written.append(plot(out_dir / name))
            print(f"wrote {out_dir / name}")
        except Skip as reason:
            skipped.append(f"skip {name}: {reason}")
            print(skipped[-1])
    return written, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", type=Path, help="run directories (default: every run in --results)")
    p.add_argument("--results", type=Path, default=ROOT / "results", help="the results folder (no RUN_DIR given)")
    p.add_argument(
        "--out", type=Path, default=None, help="where the PNGs go (default: <results>/figures, or RUN_DIR/figures)"
    )
    a = p.parse_args(argv)
    if plt is None:
        sys.exit(NO_MATPLOTLIB)
    if a.out and a.out.exists() and not a.out.is_dir():
        sys.exit(f"error: --out {a.out} is a file, not a folder")
    if not a.runs:
        if not a.results.is_dir():
            sys.exit(f"error: --results {a.results}: no such folder")
        draw(results_figures(a.results), a.out or a.results / "figures")
        return
    not_runs = []
    for run_dir in a.runs:
        if run_dir.is_file() and run_dir.suffix == ".json":  # bench.py --out FILE
            draw(
                [(f"{run_dir.stem}.png", lambda out, b=run_dir: plot_bench(b, out))],
                a.out or run_dir.parent / "figures",
            )
            continue
        if run_script(run_dir) is None:
            is_run = (run_dir / "args.json").is_file() and (run_dir / "metrics.json").is_file()
            print(
                f"skip {run_dir}: "
                + ("its args.json names no script" if is_run else "not a run directory (no args.json and metrics.json)")
            )
            not_runs.append(str(run_dir))
            continue
        figures = run_figures(run_dir)
        if not figures:
            print(f"skip {run_dir}: no figures for {run_script(run_dir)}.py runs")
        draw(figures, a.out or run_dir / "figures")
    if not_runs:  # the others' figures are drawn; a named folder that is no run is still an error
        sys.exit(f"error: not a run of this project: {', '.join(not_runs)}")


if __name__ == "__main__":
    main()
