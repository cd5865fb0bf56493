"""Separate and merged coarse/fine networks with classifier adaptation.

Paper: A. Dutt, D. Pellerin, G. Quenot, "Improving Hierarchical Image Classification with Merged
CNN Architectures", CBMI 2017. The five architectures of Figure 2 (separate, merge-0..3) on a
pre-activation bottleneck ResNet-164 or DenseNet-BC-100, classifier adaptation (Algorithm 1) swept
over alpha = 0, 0.1, ..., 2, ensembles of the runs, paired t-tests. The full account of every
reading and deviation, the protocols, the cost and the outputs: docs/merged_resnet.md.

    python merged_resnet.py --dataset cifar100 --backbone resnet --runs 5     # the paper's setting
    python merged_resnet.py --dataset cifar100 --backbone densenet --runs 5
    torchrun --standalone --nproc_per_node 4 merged_resnet.py --dataset cifar100 --runs 1 --out-dir D
    torchrun --standalone --nproc_per_node 4 merged_resnet.py --resume D --runs 2    # ... up to --runs 5
    python merged_resnet.py --resume D --analyze-only    # every table again, from the saved logits
    python merged_resnet.py --dry-run --device cpu       # offline smoke run (shapes, --depth 11, 2 runs)

Pipeline (main): coarse and fine levels -> data (all training images, or a validation hold-out)
-> this process's share of the (architecture, run) models, each trained with its own seed and its
test / validation logits saved -> from the saved logits only (analyze): Algorithm 1 at every
alpha, ensembles, the reference alphas, t-tests, hierarchy metrics -> alpha_curve.csv/.txt,
summary.txt, metrics.json (Reports).

Paper vs ours, one line per decision (docs/merged_resnet.md, "Paper vs ours", has the reasoning):
- no validation split by default (the paper's); --val-fraction f chooses alpha on held-out data: reference_alphas
- the stem belongs to stage 1, merge-3 shares the final BN-ReLU-pool, DenseNet transitions their stage: MergedNet
- ensembles are every combination of n runs, not independent: ensemble_errors, --ensembles
- one seed per (architecture, run) model, init and batch order; separate's two nets share it: model_seed
- t-tests paired over runs on single models, need --runs >= 3, "no spread" when constant: paired_t_test, t_tests
- Algorithm 1's else branch as written (mass spread evenly over the children): classifier_adaptation
- lr drops at 50% / 75% of --epochs, ResNet warm-up 400 iterations whatever the length: make_lr_schedule
- datasets: CIFAR-100 (the paper's), shapes and CIFAR-10 offline; the coarse level: --coarse-level
- scaled-down commands (ResNet-56, 12-15 epochs, 2 runs) in docs; flag defaults are the full protocol: get_args
- training time is the sum of common.fit's epoch times, bf16 and CUDA graphs on GPU: train_stage
- consistency: common.hierarchical_metrics with the coarse head as level_preds: hierarchy_metrics
- runs grow on resume (--resume D --runs 3 trains only run 2's models); tables over all runs: assign_tasks
"""

import argparse
import csv
import io
import itertools
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common

ARCHITECTURES = ("separate", "merge-0", "merge-1", "merge-2", "merge-3")
ALPHAS = np.round(np.arange(21) * 0.1, 1)  # 0, 0.1, ..., 2 as in Figures 3 and 4
# Training cost of one model relative to one backbone (ResNet stages cost about the same FLOPs):
# separate and merge-0 train two networks, merge-k shares k of the three stages.
RELATIVE_COST = {"separate": 2.0, "merge-0": 2.0, "merge-1": 5 / 3, "merge-2": 4 / 3, "merge-3": 1.0}
BACKBONE_DEFAULTS = {  # each backbone's own CIFAR protocol
    "resnet": {"depth": 164, "epochs": 164, "batch_size": 128, "warmup_iters": 400, "nesterov": False},
    "densenet": {"depth": 100, "epochs": 300, "batch_size": 64, "warmup_iters": 0, "nesterov": True},
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # epochs and batch size depend on the backbone: None means the backbone's paper value.
    common.add_common_args(parser, epochs=None, batch_size=None, lr=0.1, dataset="shapes", distributed="sweep")
    g = parser.add_argument_group("merged architectures")
    p = parser.add_argument_group("paper fidelity and ablations (every default is the paper's; docs/merged_resnet.md)")
    pos, nonneg, text = common.positive_int, common.nonneg_float, common.nonempty
    g.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    g.add_argument("--runs", type=pos, default=5, help="repeats (mean +- std, t-tests); a resume may raise it")
    g.add_argument("--ensembles", type=pos, nargs="+", default=[1, 2, 4], help="ensemble sizes built from the runs")
    g.add_argument("--coarse-level", type=text, help="level used as 'coarse' (default: the one above the fine)")
    g.add_argument("--ttest-alpha", type=nonneg, default=1.0, help="alpha at which architectures are t-tested")
    g.add_argument("--eval-batch-size", type=pos, default=1000)
    # --tasks and --analyze-only pick what a call does in the run directory, not the experiment.
    g.add_argument("--tasks", type=text, metavar="I/K", help="train only share I of K of the models (torchrun)")
    g.add_argument("--analyze-only", action="store_true", help="with --resume DIR: tables from DIR/predictions")
    p.add_argument("--backbone", default="resnet", choices=tuple(BACKBONE_DEFAULTS), help="ResNet-164 / DenseNet-BC")
    p.add_argument("--depth", type=pos, default=None, help="backbone depth (default 164 / 100; small for tests)")
    p.add_argument("--growth", type=pos, default=12, help="DenseNet-BC growth rate")
    p.add_argument("--val-fraction", type=common.fraction, default=0.0, help="held out to choose alpha (0: paper)")
    p.add_argument("--momentum", type=common.fraction, default=0.9)
    p.add_argument("--weight-decay", type=nonneg, default=1e-4)
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="(default: DenseNet yes, ResNet no)")
    p.add_argument("--warmup-iters", type=common.nonneg_int, default=None, help="at lr/10 (ResNet 400, DenseNet 0)")
    # --runs may grow: every model's seed is its (architecture, run)'s, whatever --runs was.
    # A --dry-run's own defaults (flags not given): the smallest backbone of each kind, two runs.
    args = common.parse_args(
        parser,
        argv,
        script="merged_resnet",
        resume_longer=("epochs", "runs"),
        resume_safe=("tasks", "analyze_only"),
        dry_run={"depth": lambda a: 11 if a.backbone == "resnet" else 10, "runs": 2},
    )
    return check_args(parser, args)


def check_args(parser, args):
    """The backbone's paper defaults, --tasks into (task_index, task_count), and the range checks."""
    for key, value in BACKBONE_DEFAULTS[args.backbone].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    tasks = args.tasks or default_tasks(args)
    try:
        args.task_index, args.task_count = (int(v) for v in tasks.split("/"))
    except ValueError:
        parser.error(f"--tasks must be I/K with integers, e.g. 0/4, got {args.tasks!r}")
    if not 0 <= args.task_index < args.task_count:
        parser.error(f"--tasks I/K needs 0 <= I < K, got {tasks}")
    if args.analyze_only and not args.resume:
        parser.error("--analyze-only reads a finished run directory: give it with --resume DIR")
    if args.backbone == "resnet" and (args.depth < 11 or (args.depth - 2) % 9):
        parser.error(f"--depth for the bottleneck ResNet must be 9n+2 >= 11 (e.g. 11, 29, 56, 164), got {args.depth}")
    if args.backbone == "densenet" and (args.depth < 10 or (args.depth - 4) % 6):
        parser.error(f"--depth for DenseNet-BC must be 6n+4 >= 10 (e.g. 10, 40, 100), got {args.depth}")
    if not 0.0 <= args.ttest_alpha <= 2.0 or not np.isclose(ALPHAS, args.ttest_alpha).any():
        parser.error(f"--ttest-alpha must be one of 0, 0.1, ..., 2, got {args.ttest_alpha}")
    args.architectures = list(dict.fromkeys(args.architectures))  # drop repeats, keep order
    args.ensembles = sorted(set(args.ensembles) | {1})
    return args


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def make_backbone(args, num_classes):
    if args.backbone == "resnet":
        return PreActResNetCifar(args.depth, num_classes)
    return DenseNetBC(args.depth, args.growth, num_classes)


class MergedNet(nn.Module):
    """A coarse and a fine network whose stem and first `merge` stages are the same modules.

    Both networks are built whole, then the fine network's shared parts are replaced by the
    coarse network's, so `fine_net.stages[i] is coarse_net.stages[i]` for i < merge (the same
    Parameter objects, counted once by .parameters()). merge = 0 shares nothing (Figure 2d);
    merge = number of stages also shares the head's BN-ReLU and pooling, leaving only the two
    linear soft-max layers apart (Figure 2g). forward(x) -> (coarse logits, fine logits), the
    shared part computed once."""

    def __init__(self, coarse_net, fine_net, merge):
        super().__init__()
        n_stages = len(coarse_net.stages)
        if not 0 <= merge <= n_stages:
            raise ValueError(f"merge must be in 0..{n_stages}, got {merge}")
        self.merge, self.n_stages = merge, n_stages
        self.coarse_net, self.fine_net = coarse_net, fine_net
        if merge >= 1:
            fine_net.stem = coarse_net.stem
        for i in range(merge):
            fine_net.stages[i] = coarse_net.stages[i]
        if merge == n_stages:
            fine_net.head.pre = coarse_net.head.pre

    def forward(self, x):
        if self.merge == 0:
            return self.coarse_net(x), self.fine_net(x)
        shared = self.coarse_net.stem(x)
        for stage in self.coarse_net.stages[: self.merge]:
            shared = stage(shared)
        if self.merge == self.n_stages:
            pooled = self.coarse_net.head.pool(shared)
            return self.coarse_net.head.fc(pooled), self.fine_net.head.fc(pooled)
        outputs = []
        for net in (self.coarse_net, self.fine_net):
            h = shared
            for stage in net.stages[self.merge :]:
                h = stage(h)
            outputs.append(net.head(h))
        return tuple(outputs)


def build_pair(args, n_coarse, n_fine, seed):
    """The coarse and the fine network, initialised from `seed` in the same order for every architecture."""
    torch.manual_seed(seed)
    coarse_net = make_backbone(args, n_coarse)
    fine_net = make_backbone(args, n_fine)
    return coarse_net, fine_net


def merge_depth(architecture):
    return int(architecture.split("-")[1])


def model_seed(base_seed, architecture, run):
    """The seed of one (architecture, run) model: its initialisation and its batch order.

    Distinct for every architecture and run, so separate and merge-0 are independent trainings."""
    return base_seed + 1000 * run + 100 * (ARCHITECTURES.index(architecture) + 1)


def default_tasks(args):
    """--tasks when not given: RANK/WORLD_SIZE under torchrun in sweep mode, else all (0/1).

    Left unset in args.json, so a resume takes the share of however it is started."""
    if common.launched_distributed() and args.distributed == "sweep":
        return f"{os.environ.get('RANK', '0')}/{os.environ['WORLD_SIZE']}"
    return "0/1"


def assign_tasks(architectures, runs, task_count):
    """Split the (architecture, run) models over task_count processes, run by run.

    Each run's models are packed into task_count bins by RELATIVE_COST (longest first, each into
    the lightest bin), and its heaviest bin goes to the process with the least work so far (ties:
    the lowest index). So every run is spread over all the processes: a resume that adds one run
    (a larger --runs) trains that run's models side by side, not whatever a split over every run
    left to one process; and the totals stay balanced. The split depends on the arguments alone,
    so every process computes the same one. Returns one list of (architecture, run) per process,
    in run order (a process finishes its part of run r before run r + 1)."""
    by_cost = sorted(architectures, key=lambda a: -RELATIVE_COST[a])  # stable: architecture order on ties
    shares, loads = [[] for _ in range(task_count)], [0.0] * task_count
    for run in range(runs):
        bins, bin_loads = [[] for _ in range(task_count)], [0.0] * task_count
        for architecture in by_cost:
            i = bin_loads.index(min(bin_loads))
            bins[i].append((architecture, run))
            bin_loads[i] += RELATIVE_COST[architecture]
        heaviest_bins = sorted(range(task_count), key=lambda b: -bin_loads[b])
        least_loaded = sorted(range(task_count), key=lambda i: loads[i])
        for b, i in zip(heaviest_bins, least_loaded):
            shares[i] += bins[b]
            loads[i] += bin_loads[b]
    return shares


# ---------------------------------------------------------------------------------------
# The method: classifier adaptation, error curves, t-tests
# ---------------------------------------------------------------------------------------


def classifier_adaptation(p_coarse, p_fine, fine_to_coarse, alpha):
    """Algorithm 1, for a batch: move coarse and fine probabilities toward consistency.

    p_coarse: N x Nc, p_fine: N x Nf probabilities; fine_to_coarse[j] is the coarse class of
    fine class j. Each coarse probability and the sum of its fine children's probabilities are
    projected onto their mean (target); the fine children are rescaled to sum to the target.
    alpha interpolates: 0 keeps the inputs, 1 is the projection, 2 makes the coarse
    probabilities the sums of their fine children. Returns (adjusted coarse, adjusted fine)."""
    p_coarse, p_fine = torch.as_tensor(p_coarse).double(), torch.as_tensor(p_fine).double()
    parent = torch.as_tensor(fine_to_coarse, dtype=torch.long)
    n_coarse = p_coarse.shape[1]
    q_coarse = torch.zeros_like(p_coarse).index_add_(1, parent, p_fine)  # summed fine probabilities
    target = (p_coarse + q_coarse) / 2
    adjusted_coarse = (1 - alpha) * p_coarse + alpha * target
    q_parent, target_parent = q_coarse[:, parent], target[:, parent]
    nonzero = q_parent != 0
    fine_target = p_fine * target_parent / torch.where(nonzero, q_parent, torch.ones_like(q_parent))
    adjusted_fine = (1 - alpha) * p_fine + alpha * fine_target
    # Algorithm 1's else branch: children with no probability at all share the adjusted coarse one.
    n_children = torch.bincount(parent, minlength=n_coarse).double()
    spread = (adjusted_coarse / n_children.clamp(min=1))[:, parent]
    adjusted_fine = torch.where(nonzero, adjusted_fine, spread)
    return adjusted_coarse.float(), adjusted_fine.float()


def alpha_errors(p_coarse, p_fine, y_coarse, y_fine, fine_to_coarse, alphas=ALPHAS):
    """Top-1 error (%) at every alpha: array len(alphas) x 2 (coarse, fine).

    From integer counts in float64, so equal counts give equal errors (the t-tests compare them)."""
    errors = np.zeros((len(alphas), 2))
    for a, alpha in enumerate(alphas):
        adj_coarse, adj_fine = classifier_adaptation(p_coarse, p_fine, fine_to_coarse, float(alpha))
        for level, (scores, labels) in enumerate(((adj_coarse, y_coarse), (adj_fine, y_fine))):
            errors[a, level] = 100.0 * int((scores.argmax(1) != labels).sum()) / len(labels)
    return errors


def regularized_incomplete_beta(a, b, x):
    """I_x(a, b), by the continued fraction of Numerical Recipes (section 6.4), modified Lentz."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):  # the fraction converges fast here; else use I_x(a,b) = 1 - I_{1-x}(b,a)
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def _beta_continued_fraction(a, b, x, max_iter=1000, eps=1e-15):
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def student_t_cdf(t, df):
    """P(T <= t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_pvalue(t, df, two_sided=True):
    """Two-sided P(|T| >= |t|), or one-sided P(T >= t)."""
    if two_sided:
        return 2.0 * student_t_cdf(-abs(t), df)
    return 1.0 - student_t_cdf(t, df)


def paired_t_test(a, b):
    """Paired Student's t-test of a against b: {mean_diff, t, df, p (two-sided), no_spread}.

    t and p are NaN with fewer than 2 pairs, and when every pair differs by the same amount
    (no_spread True): then there is no spread to test the mean difference against, and a p of 0
    (or 1, for no difference at all) would claim certainty from a handful of equal numbers."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    result = {"mean_diff": float(diff.mean()) if n else math.nan, "t": math.nan, "df": n - 1, "p": math.nan}
    result["no_spread"] = False
    if n < 2:
        return result
    mean, sd = diff.mean(), diff.std(ddof=1)
    # Errors are count / n, so "the same difference" means equal up to rounding:
    # 53/50 - 43/50 and 60/50 - 50/50 (both 0.2) differ in the last bit.
    if sd <= 1e-9 * np.abs(diff).max():
        result["no_spread"] = True
        return result
    t = mean / (sd / math.sqrt(n))
    result.update(t=float(t), p=student_t_pvalue(t, n - 1))
    return result


T_TEST_MIN_RUNS = 3  # 2 runs: 1 degree of freedom, where two-sided p < 0.05 needs |t| > 12.71: no usable test


def t_critical(df, p=0.05):
    """The two-sided critical |t| at level p with df degrees of freedom (bisection on the p-value)."""
    low, high = 0.0, 1e4
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if student_t_pvalue(middle, df) > p else (low, middle)
    return high


def runs_support(runs, ensembles):
    """Plain sentences on what `runs` repeats can and cannot support: the t-tests, the +- bands,
    and each ensemble size in `ensembles` (summary.txt and metrics.json)."""
    plural = "s" if runs > 1 else ""
    if runs < T_TEST_MIN_RUNS:
        degrees = f"{runs - 1} degree{'' if runs == 2 else 's'} of freedom"
        t_line = (
            f"t-tests: none. {runs} run{plural} give{'' if plural else 's'} {degrees}; a paired t-test needs "
            f"{T_TEST_MIN_RUNS} runs to say anything (at 1 degree of freedom two-sided p < 0.05 needs "
            f"|t| > {t_critical(1):.2f})."
        )
    else:
        t_line = (
            f"t-tests: paired over {runs} runs, {runs - 1} degrees of freedom: p < 0.05 needs |t| > "
            f"{t_critical(runs - 1):.2f}. Only differences large against their run-to-run spread can reach it; "
            "a difference that does not is not shown to be absent (so few runs give the test little power)."
        )
    lines = [t_line]
    if runs == 1:
        lines.append("Bands: none (one run).")
    elif runs == 2:
        lines.append(
            "Bands: the std of two runs is their difference / sqrt(2), one number: not a spread to read curves by."
        )
    else:
        lines.append(
            f"Bands: the std over {runs} runs is a rough estimate, itself uncertain by about "
            f"+-{100 / math.sqrt(2 * (runs - 1)):.0f}% (1 / sqrt(2 (n - 1)))."
        )
    for size in sorted(set(ensembles) - {1}):
        combinations = math.comb(runs, size)
        if size > runs:
            lines.append(f"ensemble-{size}: needs {size} runs.")
        elif combinations == 1:
            lines.append(f"ensemble-{size}: one ensemble of all {runs} runs, no band.")
        else:
            lines.append(
                f"ensemble-{size}: {combinations} combinations of the {runs} runs; they share models, so their std "
                "is not that of independent ensembles (it understates it)."
            )
    return lines


def ensemble_errors(probs, labels, fine_to_coarse, size):
    """Ensemble-`size` error curves from single models: every combination of `size` runs.

    probs: one (p_coarse, p_fine) per run; labels: (y_coarse, y_fine). The members' probabilities
    are averaged, then adapted. Returns (combinations, errors: combinations x alphas x 2)."""
    combinations = list(itertools.combinations(range(len(probs)), size))
    errors = []
    for members in combinations:
        p_coarse = torch.stack([probs[r][0] for r in members]).mean(0)
        p_fine = torch.stack([probs[r][1] for r in members]).mean(0)
        errors.append(alpha_errors(p_coarse, p_fine, labels[0], labels[1], fine_to_coarse))
    return combinations, np.stack(errors)


# ---------------------------------------------------------------------------------------
# Training and prediction
# ---------------------------------------------------------------------------------------


def make_lr_schedule(args, steps_per_epoch):
    """lr/10 for the warm-up iterations (at most 1% of training), lr, then /10 at 50% and /100 at 75%."""
    total = args.epochs * steps_per_epoch
    warmup = min(args.warmup_iters, total // 100)
    boundaries = [warmup, int(0.5 * total), int(0.75 * total)]
    values = [args.lr / 10, args.lr, args.lr / 10, args.lr / 100]
    if warmup <= 0:
        boundaries, values = boundaries[1:], values[1:]
    return common.piecewise_lr(boundaries, values)


def joint_loss(model, x, y):
    """Sum of the coarse and fine cross-entropies (merged architectures)."""
    y_coarse, y_fine = y
    logits_coarse, logits_fine = model(x)
    loss_coarse = F.cross_entropy(logits_coarse.float(), y_coarse)
    loss_fine = F.cross_entropy(logits_fine.float(), y_fine)
    return loss_coarse + loss_fine, {
        "coarse_loss": loss_coarse,
        "fine_loss": loss_fine,
        "correct": (logits_fine.argmax(1) == y_fine).sum(),
    }


def train_stage(args, run_dir, device, stage, model, loss_fn, images, labels, seed):
    """Train one model with common.fit (checkpointed, resumable).

    Returns (training seconds, steady-state seconds): the sum of the logged epoch times, and the
    median epoch time after the first (which pays for cuDNN autotuning and graph capture) times
    the number of epochs."""
    loader = common.GpuLoader(
        images,
        labels,
        args.batch_size,
        device=device,
        mean=args.mean,
        std=args.std,
        train=True,
        crop_pad=4,
        flip=True,
        seed=seed,
        max_batches=2 if args.dry_run else None,
    )
    optimizer = common.make_sgd(
        model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay, nesterov=args.nesterov
    )
    step = common.make_train_step(
        model, loss_fn, optimizer, device=device, dtype=args.dtype, cuda_graph=args.cuda_graph, compile=args.compile
    )
    history = common.fit(
        run_dir / stage,
        model,
        optimizer,
        step,
        loader,
        epochs=args.epochs,
        lr_at=make_lr_schedule(args, len(loader)),
        log_path=run_dir / "metrics.jsonl",
        stage=stage,
    )
    seconds = [record["seconds"] for record in history]
    return np.array([sum(seconds), float(np.median(seconds[1:] or seconds)) * len(seconds)])


def predict_logits(args, device, forward, images, labels):
    """Logits of forward(x) -> (coarse logits, fine logits) over a split, on the CPU."""
    loader = common.GpuLoader(images, labels, args.eval_batch_size, device=device, mean=args.mean, std=args.std)
    (logits_coarse, logits_fine), _ = common.predict(forward, loader, device=device, dtype=args.dtype)
    return logits_coarse, logits_fine


def compact(logits):
    """bf16 when that loses nothing (the logits of a bf16-autocast model are bf16 values), else float32."""
    as_bf16 = logits.bfloat16()
    return as_bf16 if torch.equal(as_bf16.float(), logits) else logits.float()


def save_pt(path, obj):
    """torch.save, atomically; only tensors, numbers, strings and containers (weights_only loads)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    common.atomic_write_bytes(path, buffer.getvalue())


def load_pt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def prediction_path(run_dir, architecture, run):
    return run_dir / "predictions" / f"{architecture}-r{run}.pt"


def train_model(args, run_dir, device, architecture, run, splits, n_coarse, n_fine):
    """Train one (architecture, run) model and save its logits on every evaluation split.

    Writes predictions/<architecture>-r<run>.pt: {"logits": {split: {"coarse", "fine"}}, "seed",
    "epochs", "parameters", "train_seconds", "steady_train_seconds"}."""
    seed = model_seed(args.seed, architecture, run)
    coarse_net, fine_net = build_pair(args, n_coarse, n_fine, seed)
    train_images, y_coarse, y_fine = splits["train"]
    tag = f"r{run}"
    if architecture == "separate":
        coarse_net = common.to_device_model(coarse_net, device)
        fine_net = common.to_device_model(fine_net, device)
        seconds = np.zeros(2)
        for level, net, labels in (("coarse", coarse_net, y_coarse), ("fine", fine_net, y_fine)):
            stage = f"separate-{level}-{tag}"
            seconds += train_stage(
                args, run_dir, device, stage, net, common.cross_entropy_loss, train_images, labels, seed
            )
        coarse_net.eval()
        fine_net.eval()
        forward = lambda x: (coarse_net(x), fine_net(x))
        parameters = common.count_params(coarse_net) + common.count_params(fine_net)
    else:
        model = common.to_device_model(MergedNet(coarse_net, fine_net, merge_depth(architecture)), device)
        seconds = train_stage(
            args, run_dir, device, f"{architecture}-{tag}", model, joint_loss, train_images, (y_coarse, y_fine), seed
        )
        model.eval()
        forward = model
        parameters = common.count_params(model)
    logits = {}
    for split in ("val", "test"):
        if split in splits:
            coarse, fine = predict_logits(args, device, forward, splits[split][0], splits[split][1:])
            logits[split] = {"coarse": compact(coarse), "fine": compact(fine)}
    record = {
        "logits": logits,
        "seed": seed,
        "epochs": args.epochs,
        "parameters": parameters,
        "train_seconds": float(seconds[0]),
        "steady_train_seconds": float(seconds[1]),
    }
    save_pt(prediction_path(run_dir, architecture, run), record)
    return record


# ---------------------------------------------------------------------------------------
# Analysis: everything from the saved logits
# ---------------------------------------------------------------------------------------


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def load_predictions(run_dir, architectures, runs):
    """labels.pt and every model's predictions; one clear error naming the models not trained yet."""
    pred_dir = run_dir / "predictions"
    if not (pred_dir / "labels.pt").is_file():
        common.fail(f"{pred_dir}/labels.pt not found: no model of this run has been trained yet")
    missing = [f"{a}-r{r}" for a in architectures for r in range(runs) if not prediction_path(run_dir, a, r).is_file()]
    if missing:
        common.fail(f"{len(missing)} models not trained yet in {run_dir}: {', '.join(missing)} (train them first)")
    labels = load_pt(pred_dir / "labels.pt")
    models = {(a, r): load_pt(prediction_path(run_dir, a, r)) for a in architectures for r in range(runs)}
    for (a, r), model in models.items():
        for split, logits in model["logits"].items():
            if len(logits["fine"]) != len(labels["splits"][split]["fine"]):
                common.fail(
                    f"{a}-r{r}: {len(logits['fine'])} {split} predictions for {len(labels['splits'][split]['fine'])} labels"
                )
    return labels, models


def probabilities(model, split):
    logits = model["logits"][split]
    return logits["coarse"].float().softmax(1), logits["fine"].float().softmax(1)


def reference_alphas(curves, level_names, select_on):
    """Per architecture, ensemble size and level: the alpha of least mean error on `select_on`
    ("val": the chosen alpha; "test": the curve's minimum, a description), with the test error
    there and at alpha 0 and 1."""
    a1 = int(np.argmin(np.abs(ALPHAS - 1.0)))
    reference = {}
    for (architecture, size), errors in curves.items():
        for level_index, level in enumerate(level_names):
            select_mean = errors[select_on][:, :, level_index].mean(0)
            a = int(np.argmin(select_mean))  # ties go to the smaller alpha
            test = errors["test"][:, :, level_index]
            entry = {"architecture": architecture, "ensemble": size, "level": level, "alpha": float(ALPHAS[a])}
            entry["source"] = "validation" if select_on == "val" else "test curve minimum (descriptive)"
            if select_on == "val":
                entry["val_err"] = float(select_mean[a])
            for name, index in (("", a), ("_alpha0", 0), ("_alpha1", a1)):
                entry[f"test_err{name}_mean"], entry[f"test_err{name}_std"] = mean_std(test[:, index])
            entry["alpha_index"] = a
            reference[f"{architecture}/ensemble-{size}/{level}"] = entry
    return reference


def t_tests(curves, reference, level_names, ttest_alpha):
    """Paired t-tests over runs (single models) on the test error: every pair of architectures at
    ttest_alpha, and each architecture's reference alpha against the alphas 0.1 and 0.2 away."""
    results = []
    a_test = int(np.argmin(np.abs(ALPHAS - ttest_alpha)))
    architectures = [arch for arch, size in curves if size == 1]
    for level_index, level in enumerate(level_names):
        for first, second in itertools.combinations(architectures, 2):
            test = paired_t_test(
                curves[first, 1]["test"][:, a_test, level_index], curves[second, 1]["test"][:, a_test, level_index]
            )
            results.append(
                {"kind": "architectures", "ensemble": 1, "level": level, "a": first, "b": second}
                | {"alpha_a": float(ALPHAS[a_test]), "alpha_b": float(ALPHAS[a_test]), **test}
            )
        for architecture in architectures:
            a_ref = reference[f"{architecture}/ensemble-1/{level}"]["alpha_index"]
            errors = curves[architecture, 1]["test"][:, :, level_index]
            for offset in (-2, -1, 1, 2):
                other = a_ref + offset
                if 0 <= other < len(ALPHAS):
                    test = paired_t_test(errors[:, a_ref], errors[:, other])
                    results.append(
                        {"kind": "alpha", "ensemble": 1, "level": level, "a": architecture, "b": architecture}
                        | {"alpha_a": float(ALPHAS[a_ref]), "alpha_b": float(ALPHAS[other]), **test}
                    )
    return results


def mean_of_records(records):
    """Mean over runs of every number in a list of equally shaped (nested) dicts; None (e.g. the
    mistake severity of a run without mistakes) is left out, and stays None when all are."""
    first = records[0]
    if isinstance(first, dict):
        return {k: mean_of_records([r[k] for r in records]) for k in first}
    values = [v for v in records if v is not None]
    return float(np.mean(values)) if values else None


def hierarchy_metrics(models, labels, architectures, runs, alpha):
    """common.hierarchical_metrics of every architecture's single models at alpha 0 and `alpha`
    (mean over runs): the adapted fine probabilities as scores, the adapted coarse head's own
    prediction as the coarse level's prediction (its consistency with the fine one)."""
    fine_to_coarse = labels["fine_to_coarse"].numpy()
    hierarchy = common.Hierarchy(
        list(labels["level_names"]),
        [list(names) for names in labels["class_names"]],
        [fine_to_coarse, np.arange(len(fine_to_coarse), dtype=np.int64)],
    )
    y_fine = labels["splits"]["test"]["fine"]
    result = {}
    for architecture in architectures:
        entry = {"alpha": alpha}
        for name, a in (("at_alpha0", 0.0), ("at_alpha", alpha)):
            per_run = []
            for run in range(runs):
                p_coarse, p_fine = probabilities(models[architecture, run], "test")
                adj_coarse, adj_fine = classifier_adaptation(p_coarse, p_fine, fine_to_coarse, a)
                level_preds = {hierarchy.level_names[0]: adj_coarse.argmax(1)}
                log_fine = adj_fine.clamp(min=1e-30).log()  # it soft-maxes scores: log-probabilities
                per_run.append(common.hierarchical_metrics(log_fine, y_fine, hierarchy, level_preds=level_preds))
            entry[name] = mean_of_records(per_run)
        result[architecture] = entry
    return result


def analyze(args, run_dir):
    """Every table of the run from predictions/: curves, ensembles, chosen alphas, t-tests, metrics."""
    labels, models = load_predictions(run_dir, args.architectures, args.runs)
    fine_to_coarse = labels["fine_to_coarse"].numpy()
    level_names = ("coarse", "fine")
    splits = [split for split in ("val", "test") if split in labels["splits"]]
    sizes = [size for size in args.ensembles if size <= args.runs]
    if len(sizes) < len(args.ensembles):
        print(f"ensembles above --runs {args.runs} skipped: {[s for s in args.ensembles if s > args.runs]}", flush=True)

    # Error vs alpha of every ensemble size (ensemble-1: the single models).
    curves = {}
    for architecture in args.architectures:
        for size in sizes:
            curves[architecture, size] = {}
            for split in splits:
                y = labels["splits"][split]
                probs = [probabilities(models[architecture, run], split) for run in range(args.runs)]
                members, errors = ensemble_errors(probs, (y["coarse"], y["fine"]), fine_to_coarse, size)
                curves[architecture, size][split] = errors  # combinations x alphas x 2
            curves[architecture, size]["members"] = [list(m) for m in members]  # run indices
    costs = {}
    for architecture in args.architectures:
        records = [models[architecture, run] for run in range(args.runs)]
        costs[architecture] = {
            "parameters": records[0]["parameters"],
            "train_seconds": float(np.mean([r["train_seconds"] for r in records])),
            "steady_train_seconds": float(np.mean([r["steady_train_seconds"] for r in records])),
            "train_seconds_total": float(np.sum([r["train_seconds"] for r in records])),
            "seeds": [r["seed"] for r in records],
        }

    write_alpha_tables(run_dir, curves, level_names, splits)
    reference = reference_alphas(curves, level_names, "val" if "val" in splits else "test")
    tests = t_tests(curves, reference, level_names, args.ttest_alpha) if args.runs >= T_TEST_MIN_RUNS else []
    support = runs_support(args.runs, args.ensembles)
    # Hierarchical metrics at alpha 0 and at the chosen alpha (validation, fine level), else at
    # alpha 1, fixed in advance (nothing is chosen on the test set).
    metric_alpha = {
        a: reference[f"{a}/ensemble-1/fine"]["alpha"] if "val" in splits else 1.0 for a in args.architectures
    }
    hier = {}
    for architecture in args.architectures:
        hier |= hierarchy_metrics(models, labels, [architecture], args.runs, metric_alpha[architecture])
    summary = summary_text(reference, tests, costs, hier, args.runs, support)
    common.write_text(run_dir / "summary.txt", summary)
    print(summary, flush=True)
    points = {k: {key: v for key, v in entry.items() if key != "alpha_index"} for k, entry in reference.items()}
    metrics = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "depth": args.depth,
        "coarse_level": labels["level_names"][0],
        "n_coarse": len(labels["class_names"][0]),
        "n_fine": len(labels["class_names"][1]),
        "runs": args.runs,
        "ensembles": sizes,
        "val_fraction": args.val_fraction,
        "alphas": ALPHAS,
        "costs": costs,
        # results_table.py reads best_alpha; without a validation split the curve's minimum is no choice.
        ("best_alpha" if "val" in splits else "test_curve_minimum"): points,
        "t_tests": tests,
        "runs_support": support,
        "hierarchical_metrics": hier,
        "curves": {
            f"{arch}/ensemble-{size}": {"members": errors["members"]}
            | {split: {level: errors[split][:, :, i] for i, level in enumerate(level_names)} for split in splits}
            for (arch, size), errors in curves.items()
        },
    }
    common.write_json(run_dir / "metrics.json", metrics)
    print(f"wrote {run_dir}/alpha_curve.csv, alpha_curve.txt, summary.txt, metrics.json", flush=True)
    return metrics


def make_splits(args, data, device, level_index):
    """{"train", "test"[, "val"]: (images, coarse labels, fine labels)} on the device; "val" is
    --val-fraction of every fine class (common.stratified_split, seeded), held out of training."""
    hierarchy = data.hierarchy
    train_labels = data.train.labels.numpy()
    if args.val_fraction > 0:
        smallest = int(np.bincount(train_labels)[np.unique(train_labels)].min())
        val_idx, train_idx = common.stratified_split(train_labels, max(1, int(args.val_fraction * smallest)), args.seed)
    else:
        val_idx, train_idx = None, np.arange(len(train_labels))
    if len(train_idx) < args.batch_size:
        common.fail(f"{len(train_idx)} training images; fewer than one batch of {args.batch_size}")
    args.mean, args.std = data.mean, data.std

    def split_on_device(split, idx=None):
        split = split.subset(idx) if idx is not None else split
        fine = split.labels.to(device)
        return split.images.to(device), hierarchy.labels(level_index, fine), fine

    splits = {"train": split_on_device(data.train, train_idx), "test": split_on_device(data.test)}
    if val_idx is not None:
        splits["val"] = split_on_device(data.train, val_idx)
    if args.dry_run:  # two evaluation batches per split
        for split in ("val", "test"):
            if split in splits:
                splits[split] = tuple(t[: 2 * args.eval_batch_size] for t in splits[split])
    n_val = len(splits["val"][0]) if "val" in splits else 0
    print(f"train {len(train_idx)}, validation {n_val}, test {len(splits['test'][0])} images", flush=True)
    return splits


def save_labels(run_dir, splits, hierarchy, level_index):
    """predictions/labels.pt: the validation and test labels of both levels, the coarse/fine map, the names."""
    save_pt(
        run_dir / "predictions" / "labels.pt",
        {
            "splits": {
                s: {"coarse": splits[s][1].cpu(), "fine": splits[s][2].cpu()} for s in ("val", "test") if s in splits
            },
            "fine_to_coarse": torch.as_tensor(hierarchy.parents[level_index], dtype=torch.long),
            "level_names": [hierarchy.level_names[level_index], hierarchy.level_names[-1]],
            "class_names": [list(hierarchy.class_names[level_index]), list(hierarchy.class_names[-1])],
        },
    )


# ---------------------------------------------------------------------------------------
# The two backbones: pre-activation bottleneck ResNet (9n+2, 164 in the paper) and DenseNet-BC
# ---------------------------------------------------------------------------------------


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 + shortcut (He et al., identity mappings)."""

    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), common.conv3x3(width, width, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), nn.Conv2d(width, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride > 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNetCifar(common.Backbone):
    """Pre-activation bottleneck ResNet for CIFAR, depth 9n+2 (164: n=18; 1.7M parameters)."""

    def __init__(self, depth=164, num_classes=10):
        super().__init__()
        if (depth - 2) % 9:
            common.fail(f"pre-activation bottleneck ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.stem = common.conv3x3(3, 16)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = common.Head(cin, num_classes, pre=nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU()))
        common.init_weights(self)


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k) - BN-ReLU-conv3x3 (k), concatenated to the input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            common.conv3x3(4 * growth, growth),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetBC(common.Backbone):
    """DenseNet-BC (Huang et al.) for CIFAR: depth 100, growth 12, compression 0.5 (0.8M)."""

    def __init__(self, depth=100, growth=12, num_classes=10, compression=0.5):
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * growth
        self.stem = common.conv3x3(3, c)
        stages = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < 2:  # transition: BN-ReLU-conv1x1-avgpool
                out = int(math.floor(c * compression))
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = common.Head(c, num_classes, pre=nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()))
        common.init_weights(self)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "merged_resnet")
    if args.analyze_only:
        return analyze(args, run_dir) if common.rank() == 0 else None

    # 1. Data and the two levels: coarse = --coarse-level, fine = the leaf classes.
    data = common.load_data(args)
    hierarchy = data.hierarchy
    if hierarchy.n_levels < 2:
        common.fail(f"--dataset {args.dataset} has a single class level; give --hierarchy FILE with coarse classes")
    coarse_level = args.coarse_level or hierarchy.level_names[-2]
    if coarse_level not in hierarchy.level_names[:-1]:
        common.fail(f"--coarse-level {coarse_level!r}: choose one of {', '.join(hierarchy.level_names[:-1])}")
    level_index = hierarchy.level_names.index(coarse_level)
    n_coarse, n_fine = hierarchy.num_classes(level_index), hierarchy.num_classes(-1)
    print(f"coarse level {coarse_level!r} ({n_coarse} classes), fine ({n_fine} classes)", flush=True)

    # 2. Training split: all of it (the paper), or a class-balanced validation hold-out to choose alpha;
    # the labels and the coarse/fine map saved for analyze.
    splits = make_splits(args, data, device, level_index)
    save_labels(run_dir, splits, hierarchy, level_index)

    # 3. Train this process's share of the (architecture, run) models; each saves its logits.
    share = assign_tasks(args.architectures, args.runs, args.task_count)[args.task_index]
    for architecture, run in share:
        path = prediction_path(run_dir, architecture, run)
        if path.is_file() and load_pt(path).get("epochs", args.epochs) >= args.epochs:
            print(f"[{architecture}-r{run}] trained already: {path}", flush=True)
            continue  # a resume with a longer --epochs trains on from the checkpoint, then predicts again
        record = train_model(args, run_dir, device, architecture, run, splits, n_coarse, n_fine)
        print(
            f"[{architecture}-r{run}] seed {record['seed']}, {record['parameters']:,} parameters, "
            f"{record['train_seconds']:.1f} s of training",
            flush=True,
        )

    # 4. Curves, ensembles, alphas, t-tests and metrics, from the saved logits. Under torchrun
    # rank 0 waits for every process (every share of a sweep; its own writes under ddp), then builds them.
    wait_for_all = common.is_distributed() and args.tasks is None
    if wait_for_all:
        common.barrier()
    elif args.task_count > 1:
        print(
            f"share {args.task_index}/{args.task_count} done ({len(share)} models); when every share is, "
            f"build the tables with: python merged_resnet.py --resume {run_dir} --analyze-only",
            flush=True,
        )
    report = common.rank() == 0 if wait_for_all else args.task_count == 1
    return analyze(args, run_dir) if report else None


# ---------------------------------------------------------------------------------------
# Reports: the tables and the summary text (written by analyze)
# ---------------------------------------------------------------------------------------


def write_alpha_tables(run_dir, curves, level_names, splits):
    """alpha_curve.csv (one row per architecture, ensemble size and alpha) and alpha_curve.txt."""
    columns = [f"{split}_{level}_err_{stat}" for split in splits for level in level_names for stat in ("mean", "std")]
    rows, text = [], []
    for (architecture, size), errors in curves.items():
        n = len(errors["members"])
        over = "runs" if size == 1 else f"combinations of {size} runs"
        text.append(f"{architecture}, ensemble-{size}: top-1 error % (mean +- std over {n} {over})")
        text.append(f"{'alpha':>5} " + " ".join(f"{s + ' ' + l:>20}" for s in splits for l in level_names))
        for a, alpha in enumerate(ALPHAS):
            row = {"architecture": architecture, "ensemble": size, "members": n, "alpha": f"{alpha:.1f}"}
            cells = []
            for split in splits:
                for level_index, level in enumerate(level_names):
                    m, s = mean_std(errors[split][:, a, level_index])
                    row[f"{split}_{level}_err_mean"], row[f"{split}_{level}_err_std"] = f"{m:.3f}", f"{s:.3f}"
                    cells.append(f"{m:12.2f} +- {s:5.2f}")
            rows.append(row)
            text.append(f"{alpha:5.1f} " + " ".join(cells))
        text.append("")
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=["architecture", "ensemble", "members", "alpha", *columns])
    writer.writeheader()
    writer.writerows(rows)
    common.write_text(run_dir / "alpha_curve.csv", table.getvalue())
    common.write_text(run_dir / "alpha_curve.txt", "\n".join(text))


def summary_text(reference, tests, costs, hier, runs, support=()):
    lines = [
        "Parameters and training time per model (mean over runs; 'steady' leaves out the first epoch's",
        "warm-up: median epoch time x epochs)",
    ]
    base = costs.get("separate")
    for architecture, cost in costs.items():
        ratio = ""
        if base and base["steady_train_seconds"] > 0:
            ratio = (
                f"  ({cost['parameters'] / base['parameters']:.2f}x separate's parameters, "
                f"{cost['steady_train_seconds'] / base['steady_train_seconds']:.2f}x its steady time)"
            )
        lines.append(
            f"  {architecture:9s} {cost['parameters']:>11,d} parameters  {cost['train_seconds']:9.1f} s"
            f"  steady {cost['steady_train_seconds']:9.1f} s{ratio}"
        )
    chosen = next(iter(reference.values()))["source"] == "validation"
    lines += [
        "",
        "Test top-1 error % (mean +- std over runs, or over combinations of runs for ensembles) at alpha 0,",
        "at alpha 1, and at "
        + ("the alpha chosen on validation" if chosen else "the test curve's minimum (read off the curve, not tuned)"),
    ]
    for e in reference.values():
        lines.append(
            f"  {e['architecture']:9s} ensemble-{e['ensemble']} {e['level']:>10s}: "
            f"alpha 0 {e['test_err_alpha0_mean']:6.2f} +- {e['test_err_alpha0_std']:.2f}  "
            f"alpha 1 {e['test_err_alpha1_mean']:6.2f} +- {e['test_err_alpha1_std']:.2f}  "
            f"{'chosen' if chosen else 'minimum'} alpha {e['alpha']:.1f}: {e['test_err_mean']:6.2f} +- {e['test_err_std']:.2f}"
        )
    lines += ["", f"Paired t-tests on single models' test error over {runs} runs (two-sided p)"]
    if runs < T_TEST_MIN_RUNS:
        degrees = f"{runs - 1} degree{'' if runs == 2 else 's'} of freedom"
        lines.append(f"  no test: {runs} run{'s' if runs > 1 else ''} ({degrees}); see below")
    else:
        for t in tests:
            head = f"  {t['level']:>10s}: {t['a']} @ {t['alpha_a']:.1f} vs {t['b']} @ {t['alpha_b']:.1f}: diff {t['mean_diff']:+.3f}"
            if t["no_spread"]:
                lines.append(f"{head}  no spread (every run differs by the same amount): not testable")
            else:
                lines.append(f"{head}  t {t['t']:.3f}  df {t['df']}  p {t['p']:.4f}" + ("  *" if t["p"] < 0.05 else ""))
    if support:
        lines += ["", f"What {runs} run{'s' if runs > 1 else ''} support"] + [f"  {line}" for line in support]
    if hier:
        lines += [
            "",
            "Consistency % (coarse prediction = parent of the fine one) and fine top-1 %, test, mean over runs",
        ]
        for architecture, entry in hier.items():
            lines.append(
                f"  {architecture:9s} alpha 0: {entry['at_alpha0']['consistency']:6.2f} / {entry['at_alpha0']['top1']:6.2f}"
                f"   alpha {entry['alpha']:.1f}: {entry['at_alpha']['consistency']:6.2f} / {entry['at_alpha']['top1']:6.2f}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
