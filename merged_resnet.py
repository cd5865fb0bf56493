"""Separate and merged coarse/fine networks with classifier adaptation.

Paper: A. Dutt, D. Pellerin, G. Quenot, "Improving Hierarchical Image Classification with Merged
CNN Architectures", CBMI 2017.

What it reproduces
- The five architectures of Figure 2: `separate` (two networks, one per level, trained one after
  the other), `merge-0` (the same two networks fed the same batches, losses summed), `merge-1`,
  `merge-2` (the first k stages shared, the rest duplicated), `merge-3` (everything shared but the
  two soft-max layers). Backbones: pre-activation bottleneck ResNet-164 and DenseNet-BC-100 (k=12).
- Classifier adaptation, Algorithm 1 (`classifier_adaptation`), swept over alpha = 0, 0.1, ..., 2,
  top-1 error at both levels for every alpha (Figures 3 and 4); alpha chosen on a validation split
  held out from the training set, test error reported at that alpha.
- Ensembles (`--instances n`: the probabilities of n instances averaged before adaptation,
  ensemble-1, -2, -4, ... as in Figure 3), repeats (`--runs`, mean +- std), and the paired Student's
  t-tests of the "statistical significance" paragraph (architectures paired at alpha = 1, and the
  best alpha against alpha +- 0.1 and +- 0.2), with the t distribution's CDF computed from the
  regularised incomplete beta function (continued fraction), numpy/math only.
- Parameter counts and training time per architecture (the merged ones should cost less).

Training protocol (each backbone's own CIFAR protocol, as the paper says)
- ResNet-164 (He et al., "Identity mappings", 2016): SGD momentum 0.9, weight decay 1e-4, batch
  128, lr 0.1 (0.01 for the first 400 iterations), divided by 10 at 50% and 75% of training,
  164 epochs (64k iterations at batch 128 on 50k images).
- DenseNet-BC-100 (Huang et al., 2017): SGD with Nesterov momentum 0.9, weight decay 1e-4, batch
  64, lr 0.1 divided by 10 at 50% and 75% of 300 epochs, no dropout (with augmentation).
- Both: random horizontal flip and random 32x32 crops of the image zero-padded by 4 pixels.

Command (the paper's setting on CIFAR-100; five runs of every architecture, ResNet-164):
    python merged_resnet.py --dataset cifar100 --backbone resnet --runs 5
    python merged_resnet.py --dataset cifar100 --backbone densenet --runs 5
    python merged_resnet.py --dataset cifar100 --backbone resnet --runs 1 --instances 4   # Figure 3
Scaled-down runs (one H100; shorter, shallower, 2 runs; see "Paper vs ours"):
    python merged_resnet.py --dataset shapes --image-size 32 --train-size 10000 --test-size 2000 \
        --depth 56 --epochs 15 --runs 2                                          # all five, ~3 min
    python merged_resnet.py --dataset cifar10 --data-dir data --depth 56 --epochs 12 --runs 2 \
        --architectures separate merge-1 merge-2                                 # ~5-6 min
Offline smoke run: python merged_resnet.py --dry-run --depth 11 --runs 2 --image-size 16 --device cpu

Outputs in the run directory: alpha_curve.csv and alpha_curve.txt (top-1 error vs alpha for
every architecture and ensemble size, validation and test, mean and std over runs), summary.txt
(best alpha, test error there, t-tests, parameters, training time), metrics.json (all of it).

Paper vs ours
- Validation split: the paper tunes alpha "using a validation set" without saying which; we hold
  out `--val-fraction` (10%) of every fine class of the training set (common.stratified_split,
  seeded) and train on the rest. The best alpha is chosen per architecture, ensemble size and
  level on the validation error averaged over runs; test errors are reported at that alpha.
- Where the network is cut: the stem convolution belongs to stage 1 (so merge-1..3 share it and
  merge-0 does not); merge-3 also shares the final BN-ReLU and pooling, so only the two linear
  soft-max layers differ ("only the loss function separates the coarse and fine categories").
  DenseNet's transition layers belong to the stage they follow.
- Ensembles: the paper builds ensemble-n from its five trainings; we train `--runs` x
  `--instances` independent models and ensemble-m of a run averages that run's first m instances
  (m = 1, 2, 4, ... up to n, and n), so ensemble runs never share models.
- Seeds: instance i of run r is initialised and fed batches from the same seed in every
  architecture (separate's two networks start where merge-0's do), so comparisons are paired.
- t-tests are paired over runs (need --runs >= 2); the paper does not say what it paired over.
- Algorithm 1's else branch (a coarse class whose fine children all have probability exactly 0)
  is implemented as written: the adjusted coarse probability is spread evenly over the children.
- The learning-rate drops are at 50% / 75% of --epochs (so shortened runs keep the schedule's
  shape); the ResNet warm-up is 400 iterations at lr/10 whatever the run length.
- Datasets: CIFAR-100 (20 coarse / 100 fine) is the paper's; offline we use `shapes` (coarse level
  `shape_fill`, 12 classes, fine 72) and the CIFAR-10 copy (vehicles / animals, 2 and 10). The
  coarse level is `--coarse-level` (default: the level just above the fine classes).
- The scaled-down commands above train ResNet-56 (bottleneck, 9n+2 with n=6) instead of ResNet-164,
  for 12-15 epochs instead of 164, twice instead of five times, so that they fit in minutes; the
  flag defaults are the full protocol.
- Training time is the sum of the per-epoch wall times that common.fit logs (training only, no
  evaluation), bf16 autocast and a CUDA graph per train step on GPU.
"""

import argparse
import csv
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common

ARCHITECTURES = ("separate", "merge-0", "merge-1", "merge-2", "merge-3")
ALPHAS = np.round(np.arange(21) * 0.1, 1)  # 0, 0.1, ..., 2 as in Figures 3 and 4
BACKBONE_DEFAULTS = {  # each backbone's own CIFAR protocol
    "resnet": {"depth": 164, "epochs": 164, "batch_size": 128, "warmup_iters": 400, "nesterov": False},
    "densenet": {"depth": 100, "epochs": 300, "batch_size": 64, "warmup_iters": 0, "nesterov": True},
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # epochs and batch size depend on the backbone: None means the backbone's paper value.
    common.add_common_args(parser, epochs=None, batch_size=None, lr=0.1, dataset="shapes")
    g = parser.add_argument_group("merged architectures")
    g.add_argument(
        "--backbone",
        default="resnet",
        choices=tuple(BACKBONE_DEFAULTS),
        help="resnet: pre-activation bottleneck ResNet (depth 9n+2, 164); densenet: DenseNet-BC (100, k=12)",
    )
    g.add_argument(
        "--depth", type=common.positive_int, default=None, help="backbone depth (default 164 / 100; small for tests)"
    )
    g.add_argument("--growth", type=common.positive_int, default=12, help="DenseNet-BC growth rate")
    g.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    g.add_argument(
        "--coarse-level",
        default=None,
        help="hierarchy level used as 'coarse' (default: the one just above the fine classes)",
    )
    g.add_argument("--runs", type=common.positive_int, default=5, help="independent repeats (mean +- std, t-tests)")
    g.add_argument(
        "--instances", type=common.positive_int, default=1, help="instances per run averaged into an ensemble"
    )
    g.add_argument(
        "--val-fraction",
        type=common.positive_fraction,
        default=0.1,
        help="share of each training class held out to pick alpha",
    )
    g.add_argument("--momentum", type=common.fraction, default=0.9)
    g.add_argument("--weight-decay", type=common.nonneg_float, default=1e-4)
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Nesterov momentum (default: DenseNet yes, ResNet no)",
    )
    g.add_argument(
        "--warmup-iters",
        type=common.nonneg_int,
        default=None,
        help="iterations at lr/10 first, capped at 1%% of training (default: ResNet 400, DenseNet 0)",
    )
    g.add_argument(
        "--ttest-alpha", type=common.nonneg_float, default=1.0, help="alpha at which architectures are t-tested"
    )
    g.add_argument("--eval-batch-size", type=common.positive_int, default=500)
    args = common.parse_args(parser, argv, script="merged_resnet")
    for key, value in BACKBONE_DEFAULTS[args.backbone].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.backbone == "resnet" and (args.depth < 11 or (args.depth - 2) % 9):
        parser.error(f"--depth for the bottleneck ResNet must be 9n+2 >= 11 (e.g. 11, 29, 56, 164), got {args.depth}")
    if args.backbone == "densenet" and (args.depth < 10 or (args.depth - 4) % 6):
        parser.error(f"--depth for DenseNet-BC must be 6n+4 >= 10 (e.g. 10, 40, 100), got {args.depth}")
    if not 0.0 <= args.ttest_alpha <= 2.0 or not np.isclose(ALPHAS, args.ttest_alpha).any():
        parser.error(f"--ttest-alpha must be one of 0, 0.1, ..., 2, got {args.ttest_alpha}")
    args.architectures = list(dict.fromkeys(args.architectures))  # drop repeats, keep order
    return args


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


def make_backbone(args, num_classes):
    if args.backbone == "resnet":
        return common.PreActResNetCifar(args.depth, num_classes)
    return common.DenseNetBC(args.depth, args.growth, num_classes)


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


def inconsistency(p_coarse, p_fine, fine_to_coarse):
    """Mean over samples of sum_i |P(c_i) - sum_{s(j)=i} P(f_j)| / 2 (0 = Equation 1 holds; Figure 1)."""
    parent = torch.as_tensor(fine_to_coarse, dtype=torch.long)
    q_coarse = torch.zeros_like(p_coarse).index_add_(1, parent, p_fine)
    return 0.5 * (p_coarse - q_coarse).abs().sum(1).mean().item()


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
    """Paired Student's t-test of a against b: {mean_diff, t, df, p (two-sided)}; NaN with fewer than 2 pairs."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    if n < 2:
        return {"mean_diff": float(diff.mean()) if n else math.nan, "t": math.nan, "df": n - 1, "p": math.nan}
    mean, sd = diff.mean(), diff.std(ddof=1)
    # Identical differences leave no spread to test against. Errors are count / n, so "identical"
    # means equal up to rounding: 53/50 - 43/50 and 60/50 - 50/50 (both 0.2) differ in the last bit.
    if sd <= 1e-9 * np.abs(diff).max():
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    else:
        t = mean / (sd / math.sqrt(n))
    return {"mean_diff": float(mean), "t": float(t), "df": n - 1, "p": student_t_pvalue(t, n - 1)}


def ensemble_sizes(instances):
    """1, 2, 4, ... up to n, and n itself (ensemble-1, -2, -4 of Figure 3)."""
    sizes = {1 << i for i in range(instances.bit_length()) if 1 << i <= instances} | {instances}
    return sorted(sizes)


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


def predict_probs(args, device, forward, images, labels):
    """Soft-max probabilities of forward(x) -> (coarse logits, fine logits) over a split."""
    loader = common.GpuLoader(
        images,
        labels,
        args.eval_batch_size,
        device=device,
        mean=args.mean,
        std=args.std,
        max_batches=2 if args.dry_run else None,
    )
    (logits_coarse, logits_fine), (y_coarse, y_fine) = common.predict(forward, loader, device=device, dtype=args.dtype)
    return logits_coarse.softmax(1), logits_fine.softmax(1), y_coarse, y_fine


def train_architecture(args, run_dir, device, architecture, splits, n_coarse, n_fine, seed, tag):
    """Train one instance of an architecture.

    Returns (probs {split: (pc, pf, yc, yf)}, [seconds, steady-state seconds], parameters)."""
    coarse_net, fine_net = build_pair(args, n_coarse, n_fine, seed)
    train_images, y_coarse, y_fine = splits["train"]
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
    probs = {
        split: predict_probs(args, device, forward, splits[split][0], splits[split][1:]) for split in ("val", "test")
    }
    return probs, seconds, parameters


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def mean_std(values):
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def write_alpha_tables(run_dir, curves, level_names):
    """alpha_curve.csv (one row per architecture, ensemble size and alpha) and alpha_curve.txt."""
    columns = [
        f"{split}_{level}_err_{stat}" for split in ("val", "test") for level in level_names for stat in ("mean", "std")
    ]
    rows, text = [], []
    for (architecture, size), errors in curves.items():
        text.append(f"{architecture}, ensemble-{size}: top-1 error % (mean +- std over {errors['test'].shape[0]} runs)")
        text.append(f"{'alpha':>5} " + " ".join(f"{s + ' ' + l:>20}" for s in ("val", "test") for l in level_names))
        for a, alpha in enumerate(ALPHAS):
            row = {"architecture": architecture, "ensemble": size, "alpha": f"{alpha:.1f}"}
            cells = []
            for split in ("val", "test"):
                for level_index, level in enumerate(level_names):
                    m, s = mean_std(errors[split][:, a, level_index])
                    row[f"{split}_{level}_err_mean"], row[f"{split}_{level}_err_std"] = f"{m:.3f}", f"{s:.3f}"
                    cells.append(f"{m:12.2f} +- {s:5.2f}")
            rows.append(row)
            text.append(f"{alpha:5.1f} " + " ".join(cells))
        text.append("")
    with open(run_dir / "alpha_curve.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["architecture", "ensemble", "alpha", *columns])
        writer.writeheader()
        writer.writerows(rows)
    (run_dir / "alpha_curve.txt").write_text("\n".join(text))


def best_alphas(curves, level_names):
    """Per architecture, ensemble size and level: the alpha of least mean validation error, and the test error there."""
    best = {}
    for (architecture, size), errors in curves.items():
        for level_index, level in enumerate(level_names):
            val_mean = errors["val"][:, :, level_index].mean(0)
            a = int(np.argmin(val_mean))  # ties go to the smaller alpha
            test_at = errors["test"][:, a, level_index]
            m, s = mean_std(test_at)
            m0, s0 = mean_std(errors["test"][:, 0, level_index])
            best[f"{architecture}/ensemble-{size}/{level}"] = {
                "architecture": architecture,
                "ensemble": size,
                "level": level,
                "alpha": float(ALPHAS[a]),
                "val_err": float(val_mean[a]),
                "test_err_mean": m,
                "test_err_std": s,
                "test_err_alpha0_mean": m0,
                "test_err_alpha0_std": s0,
                "alpha_index": a,
            }
    return best


def t_tests(curves, best, level_names, ttest_alpha):
    """Paired t-tests over runs on the test error: every pair of architectures at ttest_alpha, and each
    architecture's best alpha against the alphas 0.1 and 0.2 away."""
    results = []
    a_test = int(np.argmin(np.abs(ALPHAS - ttest_alpha)))
    keys = list(curves)
    sizes = sorted({size for _, size in keys})
    for size in sizes:
        architectures = [arch for arch, s in keys if s == size]
        for level_index, level in enumerate(level_names):
            for first, second in itertools.combinations(architectures, 2):
                test = paired_t_test(
                    curves[first, size]["test"][:, a_test, level_index],
                    curves[second, size]["test"][:, a_test, level_index],
                )
                results.append(
                    {
                        "kind": "architectures",
                        "ensemble": size,
                        "level": level,
                        "a": first,
                        "b": second,
                        "alpha_a": float(ALPHAS[a_test]),
                        "alpha_b": float(ALPHAS[a_test]),
                        **test,
                    }
                )
            for architecture in architectures:
                a_best = best[f"{architecture}/ensemble-{size}/{level}"]["alpha_index"]
                errors = curves[architecture, size]["test"][:, :, level_index]
                for offset in (-2, -1, 1, 2):
                    other = a_best + offset
                    if 0 <= other < len(ALPHAS):
                        test = paired_t_test(errors[:, a_best], errors[:, other])
                        results.append(
                            {
                                "kind": "alpha",
                                "ensemble": size,
                                "level": level,
                                "a": architecture,
                                "b": architecture,
                                "alpha_a": float(ALPHAS[a_best]),
                                "alpha_b": float(ALPHAS[other]),
                                **test,
                            }
                        )
    return results


def summary_text(best, tests, costs, runs):
    lines = [
        "Parameters and training time per instance (mean over runs x instances; 'steady' leaves out the",
        "first epoch's warm-up: median epoch time x epochs)",
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
    lines += ["", "Best alpha (chosen on validation) and test top-1 error % there (mean +- std over runs)"]
    for entry in best.values():
        lines.append(
            f"  {entry['architecture']:9s} ensemble-{entry['ensemble']} {entry['level']:>10s}: alpha "
            f"{entry['alpha']:.1f}  test {entry['test_err_mean']:.2f} +- {entry['test_err_std']:.2f}"
            f"  (alpha 0: {entry['test_err_alpha0_mean']:.2f} +- {entry['test_err_alpha0_std']:.2f})"
        )
    lines += ["", f"Paired t-tests on test error over {runs} runs (two-sided p)"]
    if runs < 2:
        lines.append("  not computed: a paired t-test needs --runs >= 2")
    else:
        for t in tests:
            lines.append(
                f"  ensemble-{t['ensemble']} {t['level']:>10s}: {t['a']} @ {t['alpha_a']:.1f} vs {t['b']} @ "
                f"{t['alpha_b']:.1f}: diff {t['mean_diff']:+.3f}  t {t['t']:.3f}  df {t['df']}  p {t['p']:.4f}"
                + ("  *" if t["p"] < 0.05 else "")
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "merged_resnet")
    data = common.load_data(args)
    hierarchy = data.hierarchy
    if hierarchy.n_levels < 2:
        common.fail(f"--dataset {args.dataset} has a single class level; give --hierarchy FILE with coarse classes")
    coarse_level = args.coarse_level or hierarchy.level_names[-2]
    if coarse_level not in hierarchy.level_names[:-1]:
        common.fail(f"--coarse-level {coarse_level!r}: choose one of {', '.join(hierarchy.level_names[:-1])}")
    level_index = hierarchy.level_names.index(coarse_level)
    fine_to_coarse = hierarchy.parents[level_index]
    n_coarse, n_fine = hierarchy.num_classes(level_index), hierarchy.num_classes(-1)
    level_names = ("coarse", "fine")
    print(f"coarse level {coarse_level!r} ({n_coarse} classes), fine ({n_fine} classes)", flush=True)

    # Validation hold-out from the training set, class-balanced on the fine labels.
    train_labels = data.train.labels.numpy()
    smallest = int(np.bincount(train_labels)[np.unique(train_labels)].min())
    val_idx, train_idx = common.stratified_split(train_labels, max(1, int(args.val_fraction * smallest)), args.seed)
    if len(train_idx) < args.batch_size:
        common.fail(
            f"{len(train_idx)} training images left after the validation hold-out; fewer than one batch of {args.batch_size}"
        )
    args.mean, args.std = data.mean, data.std

    def split_on_device(split, idx=None):
        split = split.subset(idx) if idx is not None else split
        fine = split.labels.to(device)
        return split.images.to(device), hierarchy.labels(level_index, fine), fine

    splits = {
        "train": split_on_device(data.train, train_idx),
        "val": split_on_device(data.train, val_idx),
        "test": split_on_device(data.test),
    }
    print(f"train {len(train_idx)}, validation {len(val_idx)}, test {len(data.test)} images", flush=True)

    # Train runs x instances of every architecture; instance seeds are shared across architectures.
    probs, costs = {}, {}
    for architecture in args.architectures:
        seconds, parameters = [], 0
        for run in range(args.runs):
            for instance in range(args.instances):
                seed = args.seed + 1000 * run + instance
                out, secs, parameters = train_architecture(
                    args, run_dir, device, architecture, splits, n_coarse, n_fine, seed, f"r{run}-i{instance}"
                )
                probs[architecture, run, instance] = out
                seconds.append(secs)
        seconds = np.stack(seconds)
        costs[architecture] = {
            "parameters": parameters,
            "train_seconds": float(seconds[:, 0].mean()),
            "steady_train_seconds": float(seconds[:, 1].mean()),
            "train_seconds_total": float(seconds[:, 0].sum()),
        }
        print(
            f"[{architecture}] {parameters:,} parameters, {seconds[:, 0].mean():.1f} s of training per instance",
            flush=True,
        )

    # Error vs alpha for every ensemble size (ensemble-m of a run averages its first m instances).
    curves, consistency = {}, {}
    for architecture in args.architectures:
        for size in ensemble_sizes(args.instances):
            errors = {"val": [], "test": []}
            for run in range(args.runs):
                members = [probs[architecture, run, i] for i in range(size)]
                for split in ("val", "test"):
                    p_coarse = torch.stack([m[split][0] for m in members]).mean(0)
                    p_fine = torch.stack([m[split][1] for m in members]).mean(0)
                    y_coarse, y_fine = members[0][split][2], members[0][split][3]
                    errors[split].append(alpha_errors(p_coarse, p_fine, y_coarse, y_fine, fine_to_coarse))
                    if split == "test":
                        consistency.setdefault(f"{architecture}/ensemble-{size}", []).append(
                            inconsistency(p_coarse, p_fine, fine_to_coarse)
                        )
            curves[architecture, size] = {split: np.stack(errors[split]) for split in errors}  # runs x alphas x 2

    write_alpha_tables(run_dir, curves, level_names)
    best = best_alphas(curves, level_names)
    tests = t_tests(curves, best, level_names, args.ttest_alpha)
    summary = summary_text(best, tests, costs, args.runs)
    (run_dir / "summary.txt").write_text(summary)
    print(summary, flush=True)
    metrics = {
        "dataset": args.dataset,
        "backbone": args.backbone,
        "depth": args.depth,
        "coarse_level": coarse_level,
        "n_coarse": n_coarse,
        "n_fine": n_fine,
        "runs": args.runs,
        "instances": args.instances,
        "alphas": ALPHAS,
        "costs": costs,
        "best_alpha": {k: {key: v for key, v in entry.items() if key != "alpha_index"} for k, entry in best.items()},
        "t_tests": tests,
        "test_inconsistency_alpha0": {k: mean_std(v)[0] for k, v in consistency.items()},
        "curves": {
            f"{arch}/ensemble-{size}": {
                split: {level: errors[split][:, :, i] for i, level in enumerate(level_names)} for split in errors
            }
            for (arch, size), errors in curves.items()
        },
    }
    common.write_json(run_dir / "metrics.json", metrics)
    print(f"wrote {run_dir}/alpha_curve.csv, alpha_curve.txt, summary.txt, metrics.json", flush=True)


if __name__ == "__main__":
    main()
