"""Coarse network x VGG16 features by outer product, with CH / CVC / ETE coarse categories.

Paper: a CIFAR-100 course-project report, "Can hierarchical classification improve the classification
accuracy of neural networks when the number of categories is large?" (../shared/papers/coarse_outer_product.txt).
Reproduces Tables I-VII and Fig. 1-4. The full account of every reading and deviation: docs/coarse_outer_product.md.

    python coarse_outer_product.py --dataset cifar100 --data-dir data --method all      # the paper's settings
    python coarse_outer_product.py --dataset cifar100 --data-dir data --method baseline --out-dir runs/cop100
    python coarse_outer_product.py --resume runs/cop100 --method ch     # then cvc (reuses CH's VGG16), ete
    python coarse_outer_product.py --dry-run --device cpu              # smoke run, small shapes

Pipeline (main): seeded 400/100 train/validation split, normalised with the training split's statistics ->
Table I: VGG16 baseline -> Fig. 2: an early-stopped VGG16 + coarse (K=10) and recovery layers give the CH
hierarchy (label -> coarse neuron) and CVC categories (image -> coarse neuron) -> Tables III-VI: a VGG13
coarse network on them, frozen, its K probabilities x the 512 VGG16 features (outer product, Fig. 1) feed
the fine classifier -> Table VII: ETE, coarse head and VGG16 trained end to end -> metrics.json,
coarse_categories.md, coarse_accuracy_per_category.md (Reports, rebuilt from every finished stage; --resume
skips finished stages; Tables I-VII beside the paper's: python tools/results_table.py --run RUN_DIR).
Degenerate categories get a warning and metrics.json "degenerate".

Paper vs ours, one line per decision (docs/coarse_outer_product.md, "Paper vs ours", has the reasoning):
- weight decay: PyTorch SGD weight_decay=1e-3 on every parameter (keras: 2 wd on kernels only): --wd-convention
- epochs per table (81 / 31 / 66 / 32 / 76 / 67), last epoch reported: PAPER_EPOCHS, stage_epochs, --stopping
- only the CH/CVC VGG16 early-stops (patience 5, at most 81 epochs): --early-stop-patience, --pretrain-epochs
- normalisation: exact float64 per-channel statistics of the training split: whole_set_channel_stats
- CH rule: a label's largest summed ReLU activation over its 400 training-split images: ch_assignment, --ch-rule
- recovery epochs, restarts and the balance measure (normalised entropy) are ours: --recovery-epochs, --ch-restarts
- CVC labels of validation / test images from the same frozen network: cvc_assignment, build_coarse_categories
- classification layers dropout-512-ReLU-dropout-512-ReLU-linear, batch 128 (not given): ClassificationLayers
- pad-4 crop pads with black before normalisation: make_loaders (common.GpuLoader)
- Eq. 3 / Eq. 4 lambdas are ours, one ETE per --diversity-scales factor, picked on validation: diversity_lambdas
- diversity losses off by default (no table reports them): --diversity none (eq3 / eq4 as our extension)
- Trainset column: running training-mode accuracy of the reported epoch, eval mode beside it: train_stage
- K: --coarse-k (10 as the paper; 12 on shapes, 2 on CIFAR-10), CH purity vs built-in levels: categories_text
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common

METHODS = ("baseline", "ch", "cvc", "ete")
DIVERSITY_LOSSES = ("none", "eq3", "eq4")

# The paper's CIFAR-100 accuracies (train, validation, test), Tables I, III-VII and the text. Recorded in every
# run's metrics.json ("paper_cifar100"), as before the report moved out (the smoke run's golden record holds
# them); the tables beside ours are tools/results_table.py's, which holds every paper number.
PAPER_ACCURACY = {
    "baseline": (94.37, 69.03, 68.74),
    "pretrain": (67.77, 62.50, None),
    "coarse_ch": (82.09, 75.90, 75.88),
    "main_ch": (84.46, 69.90, 65.45),
    "coarse_cvc": (81.92, 77.72, 77.61),
    "main_cvc": (85.01, 67.22, 65.71),
    "ete": (92.56, 68.94, 68.42),
    "ete_eq3": (None, None, None),  # the paper reports no numbers for the diversity losses
    "ete_eq4": (None, None, None),
}
# The paper's epoch counts: Table I (81), III (31), IV (66), V (32), VI (76), VII (67).
PAPER_EPOCHS = {"baseline": 81, "coarse_ch": 31, "main_ch": 66, "coarse_cvc": 32, "main_cvc": 76, "ete": 67}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, epochs=None, batch_size=128, lr=0.01, dataset="shapes")
    pi, nf, pf = common.positive_int, common.nonneg_float, common.positive_float
    g = parser.add_argument_group("coarse_outer_product: the paper's settings")
    g.add_argument("--method", default="all", choices=METHODS + ("all",), help="which networks to train")
    g.add_argument("--coarse-k", type=pi, default=10, help="number of coarse categories K")
    g.add_argument("--val-per-class", type=pi, default=100, help="validation images per class (400/100 split)")
    g.add_argument("--momentum", type=common.fraction, default=0.9)
    g.add_argument("--weight-decay", type=nf, default=1e-3, help="L2 regularisation coefficient")
    g.add_argument("--lr-factor", type=common.positive_fraction, default=0.3, help="lr factor on a val-loss plateau")
    g.add_argument("--lr-patience", type=pi, default=5, help="epochs without a lower validation loss")
    g.add_argument("--hidden", type=pi, default=512, help="width of the two hidden linear layers")
    g.add_argument("--dropout", type=common.fraction, default=0.5)
    g.add_argument("--coarse-epochs", type=pi, default=None, help="both VGG13 coarse networks (default 31 CH / 32 CVC)")
    g.add_argument("--pretrain-epochs", type=pi, default=81, help="at most this many epochs of the early-stopped VGG16")
    g.add_argument("--early-stop-patience", type=pi, default=5)
    g.add_argument("--recovery-epochs", type=pi, default=10, help="epochs of the coarse + recovery layers (ours)")
    g.add_argument("--recovery-l1", type=nf, default=0.005, help="L1 on the recovery layer's weights")
    g.add_argument("--ch-restarts", type=pi, default=3, help="recovery-layer restarts; the most balanced is kept")
    g = parser.add_argument_group("paper fidelity and ablations (docs/coarse_outer_product.md, Paper vs ours)")
    g.add_argument("--wd-convention", default="pytorch", choices=("pytorch", "keras"), help="keras: L2 on kernels")
    g.add_argument("--stopping", default="fixed", choices=("fixed", "early"), help="fixed: each table's epochs")
    g.add_argument("--ch-rule", default="sum", choices=("sum", "vote"), help="CH: summed activation or per-image votes")
    g.add_argument("--diversity", nargs="+", default=["none"], choices=DIVERSITY_LOSSES, help="ETE: eq3/eq4 ours")
    g.add_argument("--diversity-scales", nargs="+", type=pf, default=[0.1, 1.0, 10.0], help="factors on Eq. 3/4")
    g.add_argument("--lambda1", type=nf, default=1e-3, help="Eq. 3: weight of the Mexican hat")
    g.add_argument("--lambda2", type=nf, default=3e-3, help="Eq. 3: quartic coefficient of the hat")
    g.add_argument("--lambda3", type=nf, default=1e-4, help="Eq. 3: weight of the overlap term")
    g.add_argument("--lambda4", type=nf, default=1e-4, help="Eq. 4: lambda")
    # A resume may lengthen --epochs (stages nothing builds on), not the coarse, pre-training or
    # recovery stages that later stages are trained from; --method and the diversity flags pick
    # which stages a call runs (each stage is named by them), so a resume may change them.
    args = common.parse_args(
        parser,
        argv,
        script="coarse_outer_product",
        resume_safe=("method", "diversity", "diversity_scales"),
        # A --dry-run's own defaults (flags not given): fewer images (VGG16 passes over every one of
        # them to assign the coarse categories), one held out per class, one restart.
        dry_run={"train_size": 144, "test_size": 32, "batch_size": 8, "val_per_class": 1, "ch_restarts": 1},
    )
    return check_args(parser, args)


def check_args(parser, args):
    """Range checks the flag types cannot make."""
    if args.coarse_k < 2:
        parser.error("--coarse-k must be at least 2")
    return args


def stage_epochs(args, name):
    """Epochs of a network: the paper's count for its table unless --epochs / --coarse-epochs replace it."""
    if name.startswith("coarse_"):
        return args.coarse_epochs or PAPER_EPOCHS[name]
    if name == "pretrain":
        return args.pretrain_epochs
    return args.epochs or PAPER_EPOCHS["ete" if name.startswith("ete") else name]


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class ClassificationLayers(nn.Module):
    """The VGG classification layers: dropout, linear, ReLU, dropout, linear, ReLU, linear.

    Used as a common.VGG head: pool() is global average pooling (512 x 1 x 1 at 32x32 inputs)."""

    def __init__(self, in_features, num_classes, hidden=512, dropout=0.5):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def pool(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def fc(self, x):
        return self.layers(x)

    def forward(self, x):
        return self.fc(self.pool(x))


def make_vgg(depth, num_classes, in_features=512, hidden=512, dropout=0.5):
    """VGG13/16 with batch norm; the classification layers take `in_features` (5120 after the
    outer product with 10 coarse probabilities)."""
    net = common.VGG(depth, num_classes)
    net.head = ClassificationLayers(in_features, num_classes, hidden, dropout)
    return net


def outer_product(coarse_probs, features):
    """B x K and B x D -> B x (K*D), entry [b, k*D + d] = coarse_probs[b, k] * features[b, d]."""
    return (coarse_probs[:, :, None] * features[:, None, :]).flatten(1)


class OuterProductNet(nn.Module):
    """Fig. 1: a frozen coarse network's softmax outer the main VGG16's conv features -> fine classes."""

    def __init__(self, coarse_net, main_net):
        super().__init__()
        self.coarse_net = coarse_net.requires_grad_(False)
        self.main = main_net

    def train(self, mode=True):
        super().train(mode)
        self.coarse_net.eval()  # frozen: batch-norm statistics and dropout stay as trained
        return self

    def coarse_probs(self, x):
        with torch.no_grad():
            return self.coarse_net(x).float().softmax(1)

    def forward(self, x):
        return self.main.head.fc(outer_product(self.coarse_probs(x), self.main.features(x)))


class EndToEndNet(nn.Module):
    """Fig. 4: the VGG16 conv features feed both the coarse classification layers (softmax over K)
    and, through the outer product with that softmax, the fine classification layers."""

    def __init__(self, num_classes, k, hidden=512, dropout=0.5):
        super().__init__()
        self.main = make_vgg(16, num_classes, k * 512, hidden, dropout)
        self.coarse_layers = ClassificationLayers(512, k, hidden, dropout)

    def forward_with_coarse(self, x):
        features = self.main.features(x)
        coarse = self.coarse_layers.fc(features).float().softmax(1)
        return self.main.head.fc(outer_product(coarse, features)), coarse

    def forward(self, x):
        return self.forward_with_coarse(x)[0]


class CoarseProjectionNet(nn.Module):
    """Fig. 2: a trained, frozen VGG16's fine output -> batch norm -> K-unit ReLU coarse layer ->
    fine-class recovery layer."""

    def __init__(self, trained_vgg, num_classes, k):
        super().__init__()
        self.vgg = trained_vgg.requires_grad_(False)
        self.norm = nn.BatchNorm1d(num_classes)
        self.coarse_layer = nn.Linear(num_classes, k)
        self.recovery_layer = nn.Linear(k, num_classes)

    def train(self, mode=True):
        super().train(mode)
        self.vgg.eval()
        return self

    def coarse_activations(self, x):
        with torch.no_grad():
            logits = self.vgg(x).float()
        return F.relu(self.coarse_layer(self.norm(logits)))

    def forward(self, x):
        return self.recovery_layer(self.coarse_activations(x))


# ---------------------------------------------------------------------------------------
# The method: coarse-category construction, diversity losses, training stages
# ---------------------------------------------------------------------------------------


def ch_assignment(activations, labels, num_classes, rule="sum"):
    """CH: fine label f -> the coarse neuron its images activate the most.

    activations: N x K coarse-layer (ReLU) outputs; labels: N fine labels. rule "sum": the neuron
    with the largest activation summed over f's images; rule "vote": the neuron that is the
    argmax (of the activations, hence of their softmax) for most of f's images, images whose
    activations are all zero abstaining (flat softmax). Ties go to the lowest neuron.
    Returns num_classes coarse labels."""
    labels = labels.long()
    totals = torch.zeros(num_classes, activations.shape[1], dtype=torch.float64)
    if rule == "sum":
        totals.index_add_(0, labels, activations.double())
    elif rule == "vote":
        voting = activations.max(1).values > 0
        winners = activations.argmax(1)
        ones = torch.ones(int(voting.sum()), dtype=torch.float64)
        totals.index_put_((labels[voting], winners[voting]), ones, accumulate=True)
    else:
        raise ValueError(f"unknown CH rule {rule!r}")
    return totals.argmax(1)


def cvc_assignment(activations):
    """CVC: every image -> its most activated coarse neuron, whatever its label."""
    return activations.argmax(1)


def diversity_eq3(o, lambda1, lambda2, lambda3):
    """Eq. 1-3 on a mini-batch of coarse outputs o (B x K):
    c(i) = argmax_j o_j(i); sigma_c = sum_{i: c(i)=c} o(i);
    L = lambda1 sum_c (-|sigma_c|^2 + lambda2 |sigma_c|^4) + lambda3 sum_{c != c'} sigma_c^T sigma_c'."""
    # B x K, row i is the one-hot c(i) (scatter, unlike F.one_hot, never syncs inside a CUDA graph)
    assigned = torch.zeros_like(o).scatter_(1, o.argmax(1, keepdim=True), 1.0)
    sigma = assigned.t() @ o  # K x K, row c is sigma_c (zero for an empty category)
    norm2 = (sigma**2).sum(1)
    mexican_hat = (-norm2 + lambda2 * norm2**2).sum()
    gram = sigma @ sigma.t()
    overlap = gram.sum() - gram.diagonal().sum()
    return lambda1 * mexican_hat + lambda3 * overlap


def diversity_eq4(o, lam):
    """Eq. 4: lambda sum_{i != j} o(i)^T o(j) = lambda (|sum_i o(i)|^2 - sum_i |o(i)|^2)."""
    total = o.sum(0)
    return lam * ((total**2).sum() - (o**2).sum())


def diversity_lambdas(args, loss, scale):
    """The lambdas of one ETE run: the base lambdas times the sweep factor (lambda2 shapes the hat)."""
    if loss == "eq3":
        return {"lambda1": args.lambda1 * scale, "lambda2": args.lambda2, "lambda3": args.lambda3 * scale}
    if loss == "eq4":
        return {"lambda4": args.lambda4 * scale}
    return {}


def whole_set_channel_stats(images, chunk=4096):
    """Per-channel mean and std (in [0, 1] units) of every image of a uint8 N x C x H x W set,
    accumulated in float64 chunk by chunk (exact, and no N x C x H x W float copy)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].double() / 255
        total += x.sum((0, 2, 3))
        total_sq += (x**2).sum((0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean**2).clamp(min=0) * count / max(count - 1, 1)  # unbiased, as torch.std
    return tuple(mean.tolist()), tuple(var.sqrt().clamp(min=1e-3).tolist())


def sgd_param_groups(params, weight_decay, convention):
    """SGD parameter groups for the L2 convention.

    keras: kernel_regularizer=l2(wd) adds wd * sum(w^2) of every convolution and linear weight to
    the loss, whose gradient is 2 wd w: weight_decay 2 wd on the weight matrices (ndim > 1), none on
    biases and batch-norm parameters. pytorch: weight_decay wd on every parameter."""
    params = list(params)
    if convention == "pytorch":
        return [{"params": params, "weight_decay": weight_decay}]
    if convention != "keras":
        raise ValueError(f"unknown weight-decay convention {convention!r}")
    kernels = [p for p in params if p.ndim > 1]
    others = [p for p in params if p.ndim <= 1]
    return [
        g
        for g in ({"params": kernels, "weight_decay": 2 * weight_decay}, {"params": others, "weight_decay": 0.0})
        if g["params"]
    ]


def normalised_entropy(counts):
    """1 for equal counts, 0 when everything sits in one category."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) < 2 or counts.sum() == 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / math.log(len(counts)))


def balance_report(counts):
    counts = np.asarray(counts)
    return {
        "counts": counts.tolist(),
        "normalised_entropy": normalised_entropy(counts),
        "empty": int((counts == 0).sum()),
        "largest": int(counts.max()),
        "smallest": int(counts.min()),
    }


def degenerate_check(name, counts, what):
    """None when every coarse category holds something; else one warning line and the entry for
    metrics.json's "degenerate" (empty categories, or all in one: a 100% coarse accuracy that means nothing)."""
    counts = np.asarray(counts)
    used = int((counts > 0).sum())
    if used == len(counts):
        return None
    entry = {
        "used": used,
        "of": len(counts),
        "empty": len(counts) - used,
        "single": used <= 1,
        "per_category": counts.tolist(),
        "unit": what,
    }
    kind = "all in one category" if used <= 1 else f"{len(counts) - used} empty"
    print(
        f"warning: {name}: degenerate coarse categories, {used} of {len(counts)} used ({kind}; {what} per category "
        f"{counts.tolist()})",
        file=sys.stderr,
        flush=True,
    )
    return entry


def purity(assignment, parents):
    """Share of fine classes whose coarse category's majority built-in parent is their own parent."""
    assignment, parents = np.asarray(assignment), np.asarray(parents)
    agree = 0
    for c in np.unique(assignment):
        agree += np.bincount(parents[assignment == c]).max()
    return float(agree / len(assignment))


def matching_level(assignment, hierarchy):
    """The dataset level whose partition of the fine classes is exactly `assignment`'s, as
    (level name, coarse category -> level class array), or None."""
    assignment = np.asarray(assignment)
    for level in range(hierarchy.n_levels - 1):
        parents = np.asarray(hierarchy.parents[level])
        same_category = assignment[:, None] == assignment[None, :]
        same_parent = parents[:, None] == parents[None, :]
        if np.array_equal(same_category, same_parent):
            to_level = np.full(int(assignment.max()) + 1, -1)
            to_level[assignment] = parents
            return hierarchy.level_names[level], to_level
    return None


def per_category_accuracy(logits, targets, k):
    """Fig. 3: the coarse network's accuracy on the images of each true coarse category."""
    pred = logits.argmax(1)
    result = []
    for c in range(k):
        mask = targets == c
        result.append(100.0 * (pred[mask] == c).float().mean().item() if mask.any() else None)
    return result


class StopTraining(Exception):
    """Raised from fit's on_epoch_end when early stopping ends a stage."""


class EarlyStopping:
    """Stop once the validation loss has not decreased for `patience` epochs; the best weights
    are kept in stage_dir/best.pt and a finished stage leaves stage_dir/stopped.json."""

    def __init__(self, stage_dir, patience):
        self.best_path, self.marker = Path(stage_dir) / "best.pt", Path(stage_dir) / "stopped.json"
        self.patience = patience
        self.best, self.best_epoch, self.bad = float("inf"), 0, 0

    def update(self, epoch, val_loss, model):
        """Returns True when training should stop."""
        if val_loss < self.best:
            self.best, self.best_epoch, self.bad = val_loss, epoch, 0
            common.save_checkpoint(self.best_path, model.state_dict())
        else:
            self.bad += 1
        return self.bad >= self.patience

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.best_epoch, self.bad = state["best"], state["best_epoch"], state["bad"]


def finished_stage(ctx, name, model=None, epochs=None):
    """A finished stage's result (and its final weights loaded into `model`), or None. A stage that
    ran fewer than `epochs` (a resume with a longer --epochs) is not finished: it trains on."""
    stage_dir = ctx["run_dir"] / name
    path = stage_dir / "result.json"
    if not path.is_file():
        return None
    ran = json.loads(path.read_text()).get("max_epochs")
    if epochs is not None and ran is not None and ran < epochs:
        print(f"[{name}] finished at {ran} epochs; training on to {epochs}", flush=True)
        return None
    if model is not None:
        final = stage_dir / "final.pt"
        common.load_weights(model, common.load_checkpoint(final, ctx["device"]), final)
        model.eval()
    print(f"[{name}] finished before; using its result", flush=True)
    return json.loads(path.read_text())


def finish_stage(ctx, name, result, model=None):
    """Mark a stage finished: its final weights (for the stages downstream) and its result."""
    stage_dir = ctx["run_dir"] / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        common.save_checkpoint(stage_dir / "final.pt", model.state_dict())
    common.write_json(stage_dir / "result.json", result)
    return result


def train_stage(ctx, name, model, loss_fn, train_loader, validate, epochs, params=None, early_stopping=False):
    """One training stage through common.fit: SGD momentum, L2 (--wd-convention), lr x factor on a
    validation-loss plateau (checkpointed with the stage), optional early stopping with the best
    weights restored; continues an interrupted stage from its last epoch.

    validate() -> {"val_loss": ..., ...}. Returns (model, {"epochs": ..., "best_epoch": ...})."""
    args, run_dir, device = ctx["args"], ctx["run_dir"], ctx["device"]
    stage_dir = run_dir / name
    log_path = run_dir / "metrics.jsonl"
    params = list(model.parameters()) if params is None else list(params)
    groups = sgd_param_groups(params, args.weight_decay, args.wd_convention)
    optimizer = common.make_sgd(groups, args.lr, momentum=args.momentum, weight_decay=0.0)
    plateau = ReduceOnPlateau(args.lr, factor=args.lr_factor, patience=args.lr_patience)
    early_stopping = early_stopping or args.stopping == "early"
    stopper = EarlyStopping(stage_dir, args.early_stop_patience) if early_stopping else None
    extra_state = {"plateau": plateau, **({"early_stopping": stopper} if stopper else {})}
    step = common.make_train_step(
        model, loss_fn, optimizer, device=device, dtype=args.dtype, cuda_graph=args.cuda_graph, compile=args.compile
    )

    def on_epoch_end(epoch, record):
        record["next_lr"] = plateau.update(record["val_loss"])
        if stopper is not None and stopper.update(epoch, record["val_loss"], model):
            common.append_jsonl(log_path, {**record, "early_stopped": True})  # fit logs only after this hook
            common.write_json(
                stopper.marker,
                {"stopped_epoch": epoch, "best_epoch": stopper.best_epoch, "best_val_loss": stopper.best},
            )
            print(
                f"[{name}] early stop at epoch {epoch}; best validation loss at epoch {stopper.best_epoch}", flush=True
            )
            raise StopTraining

    info = {}
    if stopper is not None and stopper.marker.exists():
        print(f"[{name}] early-stopped before; loading its best weights", flush=True)
    else:
        try:
            history = common.fit(
                stage_dir,
                model,
                optimizer,
                step,
                train_loader,
                epochs=epochs,
                lr_at=plateau,
                evaluate=lambda epoch: validate(),
                extra_state=extra_state,
                log_path=log_path,
                stage=name,
                on_epoch_end=on_epoch_end,
            )
            info["epochs"] = len(history)
        except StopTraining:
            pass
    if stopper is not None:
        if stopper.marker.exists():
            marker = json.loads(stopper.marker.read_text())
            info.update(epochs=marker["stopped_epoch"], best_epoch=marker["best_epoch"])
        else:
            info["best_epoch"] = common.load_checkpoint(stage_dir / "checkpoint.pt")["extra"]["early_stopping"][
                "best_epoch"
            ]
        common.load_weights(model, common.load_checkpoint(stopper.best_path, device), stopper.best_path)
    model.eval()
    records = [r for r in common.read_jsonl(log_path) if r.get("stage") == name]
    info.setdefault("epochs", max((r["epoch"] for r in records), default=0))
    info["max_epochs"] = epochs
    # The paper's Trainset column: the base code's running training-mode accuracy of the epoch whose
    # weights are reported (the best epoch when early stopping restored it).
    reported = [r for r in records if r["epoch"] == info.get("best_epoch", info["epochs"]) and "train_acc" in r]
    info["train"] = reported[-1]["train_acc"] if reported else None
    seconds = [r["seconds"] for r in records]
    if seconds:
        info["epoch_seconds_median"] = float(np.median(seconds))
        info["epoch_seconds_mean"] = float(np.mean(seconds))
        info["train_images_per_s_median"] = float(np.median([r["images_per_s"] for r in records]))
    return model, info


def run_outputs(ctx, forward, split):
    """forward over the evaluation loader of `split`; returns (outputs, image indices)."""
    outputs, (_, index) = common.predict(
        forward, ctx["eval_loaders"][split], device=ctx["device"], dtype=ctx["args"].dtype
    )
    return outputs, index


def loss_and_accuracy(ctx, forward, split, targets):
    logits, index = run_outputs(ctx, forward, split)
    y = targets[index]
    return F.cross_entropy(logits, y).item(), common.accuracy(logits, y)


def validator(ctx, model, targets):
    def validate():
        loss, acc = loss_and_accuracy(ctx, model, "val", targets["val"])
        return {"val_loss": loss, "val_acc": acc}

    return validate


def split_accuracies(ctx, forward, targets):
    """Train (eval mode, no augmentation), validation and test accuracy. The paper's Trainset column
    is train_stage's training-mode "train"; this eval-mode figure is reported beside it."""
    accuracy = {split: loss_and_accuracy(ctx, forward, split, targets[split])[1] for split in ("train", "val", "test")}
    return {"train_eval_mode": accuracy.pop("train"), **accuracy}


def hierarchical_metrics_on_test(ctx, forward, level_preds_fn=None):
    """common.hierarchical_metrics of a fine network on the test split, against the dataset's
    hierarchy; level_preds_fn(index) gives the coarse network's own level predictions when its
    categories are a level of that hierarchy."""
    logits, index = run_outputs(ctx, forward, "test")
    level_preds = level_preds_fn(index) if level_preds_fn is not None else None
    return common.hierarchical_metrics(logits, ctx["fine"]["test"][index], ctx["hierarchy"], level_preds=level_preds)


def classification_loss(model, x, y):
    return common.cross_entropy_loss(model, x, y)


def train_fine_network(ctx, name, model, params=None, early_stopping=False, keep_weights=False, level_preds_fn=None):
    """Train a fine classifier (baseline, early-stopped VGG16, or an outer-product net), or reuse
    the finished stage. Returns (model, result)."""
    fine = ctx["fine"]
    model = common.to_device_model(model, ctx["device"])
    cached = finished_stage(ctx, name, model if keep_weights else None, stage_epochs(ctx["args"], name))
    if cached is not None:
        return model, cached
    loader = ctx["train_loader"](fine["train"])
    model, info = train_stage(
        ctx,
        name,
        model,
        classification_loss,
        loader,
        validator(ctx, model, fine),
        stage_epochs(ctx["args"], name),
        params=params,
        early_stopping=early_stopping,
    )
    info.update(split_accuracies(ctx, model, fine))
    info["hierarchical"] = hierarchical_metrics_on_test(ctx, model, level_preds_fn)
    return model, finish_stage(ctx, name, info, model if keep_weights else None)


def train_recovery_layers(ctx, pretrained, restart):
    """Fig. 2: train the batch norm, coarse layer and recovery layer on the frozen VGG16."""
    args, fine = ctx["args"], ctx["fine"]
    name = f"recovery_{restart}"
    torch.manual_seed(args.seed * 1000 + restart)  # each restart its own initialisation
    net = common.to_device_model(CoarseProjectionNet(pretrained, ctx["num_classes"], args.coarse_k), ctx["device"])
    cached = finished_stage(ctx, name, net)
    if cached is not None:
        return net, cached
    trainable = [p for n, p in net.named_parameters() if not n.startswith("vgg.")]

    def loss_fn(model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        l1 = args.recovery_l1 * model.recovery_layer.weight.abs().sum()
        return ce + l1, {"correct": (logits.argmax(1) == y).sum(), "l1": l1}

    net, info = train_stage(
        ctx,
        name,
        net,
        loss_fn,
        ctx["train_loader"](fine["train"]),
        validator(ctx, net, fine),
        args.recovery_epochs,
        params=trainable,
    )
    return net, finish_stage(ctx, name, info, net)


def build_coarse_categories(ctx, pretrained):
    """CH label hierarchy and CVC per-image categories from the most balanced restart.

    Returns (hierarchy tensor, {split: per-image CVC tensor}, report); cached in categories/."""
    args = ctx["args"]
    cached = finished_stage(ctx, "categories")
    if cached is not None:
        cvc = {split: torch.tensor(v) for split, v in cached.pop("cvc").items()}
        return torch.tensor(cached.pop("assignment")), cvc, cached
    restarts = []
    for r in range(args.ch_restarts):
        net, info = train_recovery_layers(ctx, pretrained, r)
        activations, index = run_outputs(ctx, net.coarse_activations, "train_full")
        hierarchy = ch_assignment(activations, ctx["fine"]["train"][index], ctx["num_classes"], args.ch_rule)
        balance = balance_report(np.bincount(hierarchy.numpy(), minlength=args.coarse_k))
        restarts.append({"restart": r, "net": net, "hierarchy": hierarchy, "balance": balance, "info": info})
        print(
            f"[recovery_{r}] labels per coarse category {balance['counts']} "
            f"(normalised entropy {balance['normalised_entropy']:.3f})",
            flush=True,
        )
    chosen = max(restarts, key=lambda r: r["balance"]["normalised_entropy"])
    # CVC needs a category for every image of every split, so these loaders are never truncated.
    cvc = {}
    for split in ("train", "val", "test"):
        activations, index = run_outputs(ctx, chosen["net"].coarse_activations, f"{split}_full")
        labels = torch.zeros(len(index), dtype=torch.long)
        labels[index] = cvc_assignment(activations)
        cvc[split] = labels
    report = {
        "ch_rule": args.ch_rule,
        "chosen_restart": chosen["restart"],
        "restarts": [
            {"restart": r["restart"], **r["balance"], "hierarchy": r["hierarchy"].tolist(), "training": r["info"]}
            for r in restarts
        ],
    }
    result = {"assignment": chosen["hierarchy"].tolist(), "cvc": {s: v.tolist() for s, v in cvc.items()}, **report}
    finish_stage(ctx, "categories", result)
    return chosen["hierarchy"], cvc, report


def train_coarse_then_main(ctx, kind, coarse_targets, level=None):
    """Train the VGG13 coarse network on the coarse labels, freeze it, train the outer-product net.

    level: (level name, coarse category -> level class) when the categories are a level of the
    dataset's hierarchy; the coarse network's predictions are then the composite's level predictions."""
    args = ctx["args"]
    k = args.coarse_k
    name = f"coarse_{kind}"
    coarse_net = common.to_device_model(make_vgg(13, k, hidden=args.hidden, dropout=args.dropout), ctx["device"])
    coarse_info = finished_stage(ctx, name, coarse_net)
    if coarse_info is None:
        coarse_net, coarse_info = train_stage(
            ctx,
            name,
            coarse_net,
            classification_loss,
            ctx["train_loader"](coarse_targets["train"]),
            validator(ctx, coarse_net, coarse_targets),
            stage_epochs(args, name),
        )
        coarse_info.update(split_accuracies(ctx, coarse_net, coarse_targets))
        coarse_info["per_category"] = {}
        for split in ("val", "test"):
            logits, index = run_outputs(ctx, coarse_net, split)
            coarse_info["per_category"][split] = per_category_accuracy(logits, coarse_targets[split][index], k)
        finish_stage(ctx, name, coarse_info, coarse_net)
    level_preds_fn = None
    if level is not None:
        level_name, to_level = level

        def level_preds_fn(index):
            coarse_logits, coarse_index = run_outputs(ctx, coarse_net, "test")
            assert torch.equal(coarse_index, index)
            return {level_name: torch.as_tensor(to_level)[coarse_logits.argmax(1)]}

    main_net = make_vgg(16, ctx["num_classes"], k * 512, args.hidden, args.dropout)
    composite = OuterProductNet(coarse_net, main_net)
    _, main_info = train_fine_network(
        ctx, f"main_{kind}", composite, params=main_net.parameters(), level_preds_fn=level_preds_fn
    )
    return coarse_info, main_info


def coarse_usage(ctx, model, split):
    """How many ETE coarse categories the images of `split` actually fall into."""
    (_, coarse), _ = run_outputs(ctx, model.forward_with_coarse, split)
    counts = np.bincount(coarse.argmax(1).numpy(), minlength=ctx["args"].coarse_k)
    return {
        "used": int((counts > 0).sum()),
        "used_over_1pct": int((counts >= 0.01 * counts.sum()).sum()),
        "counts": counts.tolist(),
        "normalised_entropy": normalised_entropy(counts),
        "mean_max_prob": float(coarse.max(1).values.mean()),
    }


def ete_stage_name(loss, scale):
    return "ete" if loss == "none" else f"ete_{loss}_x{scale:g}"


def train_end_to_end(ctx, loss, scale=None):
    """One ETE network (Fig. 4) with diversity loss `loss` at the base lambdas times `scale`."""
    args, fine = ctx["args"], ctx["fine"]
    name = ete_stage_name(loss, scale)
    cached = finished_stage(ctx, name, epochs=stage_epochs(args, name))
    if cached is not None:
        return cached
    lambdas = diversity_lambdas(args, loss, scale)
    model = common.to_device_model(
        EndToEndNet(ctx["num_classes"], args.coarse_k, args.hidden, args.dropout), ctx["device"]
    )

    def loss_fn(model, x, y):
        logits, coarse = model.forward_with_coarse(x)
        ce = F.cross_entropy(logits.float(), y)
        with torch.autocast(ce.device.type, enabled=False):  # batch sums of up to B^2 terms: keep fp32
            if loss == "eq3":
                diversity = diversity_eq3(coarse.float(), lambdas["lambda1"], lambdas["lambda2"], lambdas["lambda3"])
            elif loss == "eq4":
                diversity = diversity_eq4(coarse.float(), lambdas["lambda4"])
            else:
                diversity = torch.zeros((), device=ce.device)
        return ce + diversity, {"correct": (logits.argmax(1) == y).sum(), "diversity": diversity}

    def validate():
        (logits, coarse), index = run_outputs(ctx, model.forward_with_coarse, "val")
        y = fine["val"][index]
        used = int(torch.unique(coarse.argmax(1)).numel())
        return {
            "val_loss": F.cross_entropy(logits, y).item(),
            "val_acc": common.accuracy(logits, y),
            "val_coarse_used": used,
        }

    model, info = train_stage(
        ctx, name, model, loss_fn, ctx["train_loader"](fine["train"]), validate, stage_epochs(args, name)
    )
    info.update(split_accuracies(ctx, model, fine))
    info["hierarchical"] = hierarchical_metrics_on_test(ctx, model)
    info["diversity"] = {"loss": loss, "scale": scale, **lambdas}
    info["usage"] = {split: coarse_usage(ctx, model, split) for split in ("train", "val", "test")}
    return finish_stage(ctx, name, info)


def select_on_validation(runs):
    """Among ETE runs of one diversity loss, the most accurate on validation whose coarse head keeps
    at least two categories alive (>= 1% of the validation images each); None if none does."""
    alive = [r for r in runs if r["usage"]["val"]["used_over_1pct"] >= 2]
    return max(alive, key=lambda r: r["val"]) if alive else None


# ---------------------------------------------------------------------------------------
# The plateau schedule of the trainings: lr times a factor when the validation loss stalls
# ---------------------------------------------------------------------------------------


class ReduceOnPlateau:
    """lr times `factor` when the monitored validation loss has not decreased for `patience`
    consecutive checks. Plain state so it checkpoints with the run."""

    def __init__(self, lr, factor=0.3, patience=5, min_lr=0.0):
        self.lr, self.factor, self.patience, self.min_lr = lr, factor, patience, min_lr
        self.best, self.bad = float("inf"), 0

    def update(self, value):
        if value < self.best:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.lr, self.bad = max(self.lr * self.factor, self.min_lr), 0
        return self.lr

    def __call__(self, step):
        return self.lr

    def state_dict(self):
        return {"lr": self.lr, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "coarse_outer_product")
    if args.dry_run:
        args.coarse_epochs = args.pretrain_epochs = args.recovery_epochs = 1
    methods = METHODS if args.method == "all" else (args.method,)

    # 1. Data: the per-run, seeded, class-balanced train/validation split (400/100 per class on
    #    CIFAR-100), normalised with the statistics of the whole training split.
    data, splits, mean, std = load_splits(args)
    train_loader, eval_loaders = make_loaders(args, splits, mean, std, device)
    ctx = {
        "args": args,
        "run_dir": run_dir,
        "device": device,
        "train_loader": train_loader,
        "eval_loaders": eval_loaders,
        "fine": {name: s.labels for name, s in splits.items()},
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        "hierarchy": data.hierarchy,
    }
    print(
        f"{data.name}: {len(splits['train'])} train / {len(splits['val'])} validation / {len(splits['test'])} test "
        f"images, {data.num_classes} classes, K={args.coarse_k}, methods {', '.join(methods)}; "
        f"L2 {args.weight_decay} ({args.wd_convention}), stopping {args.stopping}, CH rule {args.ch_rule}",
        flush=True,
    )

    # 2. Table I: the VGG16 baseline.
    if "baseline" in methods:
        train_fine_network(ctx, "baseline", make_vgg(16, data.num_classes, 512, args.hidden, args.dropout))

    # 3. Fig. 2: an early-stopped VGG16, coarse + recovery layers, the CH hierarchy and CVC categories.
    purity_by_level = {}
    if "ch" in methods or "cvc" in methods:
        pretrained, _ = train_fine_network(
            ctx,
            "pretrain",
            make_vgg(16, data.num_classes, 512, args.hidden, args.dropout),
            early_stopping=True,
            keep_weights=True,
        )
        hierarchy, cvc, _ = build_coarse_categories(ctx, pretrained)
        purity_by_level = {
            data.hierarchy.level_names[l]: purity(hierarchy.numpy(), data.hierarchy.parents[l])
            for l in range(data.hierarchy.n_levels - 1)
        }

        # 4. Tables III-VI: the VGG13 coarse network on the CH / CVC categories, then the composite.
        for kind in ("ch", "cvc"):
            if kind not in methods:
                continue
            if kind == "ch":
                targets = {s: hierarchy[y] for s, y in ctx["fine"].items()}
                level = matching_level(hierarchy.numpy(), data.hierarchy)
            else:
                targets, level = cvc, None  # per-image categories are never a level of a label hierarchy
            train_coarse_then_main(ctx, kind, targets, level)

    # 5. Table VII: ETE without a diversity loss, and the Eq. 3 / Eq. 4 sweeps over the weight.
    if "ete" in methods:
        for loss in args.diversity:
            for scale in [None] if loss == "none" else args.diversity_scales:
                train_end_to_end(ctx, loss, scale)

    # 6. Reports from every finished stage of the run directory.
    return report(ctx, data, methods, mean, std, len(splits["train"]), purity_by_level)


def load_splits(args):
    """The dataset, its seeded stratified train/validation split and the training split's channel statistics."""
    data = common.load_data(args)
    if data.train.images.shape[-1] < 32:
        common.fail(f"VGG's five max-pools need images of at least 32 pixels; got {data.train.images.shape[-1]}")
    if args.coarse_k > data.num_classes:
        common.fail(f"--coarse-k {args.coarse_k} is more than the {data.num_classes} fine classes")
    val_idx, train_idx = common.stratified_split(data.train.labels.numpy(), args.val_per_class, seed=args.seed)
    splits = {"train": data.train.subset(train_idx), "val": data.train.subset(val_idx), "test": data.test}
    mean, std = whole_set_channel_stats(splits["train"].images)
    return data, splits, mean, std


def make_loaders(args, splits, mean, std, device):
    """The augmented training loader (a function of the targets) and the evaluation loaders of every split."""
    max_batches = 2 if args.dry_run else None

    def train_loader(labels):
        return common.GpuLoader(
            splits["train"].images,
            labels,
            args.batch_size,
            device=device,
            mean=mean,
            std=std,
            train=True,
            crop_pad=4,
            flip=True,
            seed=args.seed,
            max_batches=max_batches,
        )

    eval_loaders = {}
    for name, split in splits.items():
        labels = (split.labels, torch.arange(len(split)))  # the index maps outputs back to images
        eval_loaders[name] = common.GpuLoader(
            split.images, labels, args.batch_size, device=device, mean=mean, std=std, max_batches=max_batches
        )
        # CH/CVC need the coarse activations of every image, so "_full" is never truncated by --dry-run.
        eval_loaders[name + "_full"] = eval_loaders[name]
        if max_batches is not None:
            eval_loaders[name + "_full"] = common.GpuLoader(
                split.images, labels, args.batch_size, device=device, mean=mean, std=std
            )
    return train_loader, eval_loaders


# ---------------------------------------------------------------------------------------
# Reports: results of the finished stages, metrics.json, coarse_categories.md
# ---------------------------------------------------------------------------------------


def report(ctx, data, methods, mean, std, train_images, purity_by_level):
    """metrics.json, coarse_categories.md and coarse_accuracy_per_category.md from every finished stage of the
    run directory; each network's accuracies and epoch timings printed (Tables I-VII beside the paper's:
    python tools/results_table.py --run RUN_DIR)."""
    args, run_dir = ctx["args"], ctx["run_dir"]
    metrics = collect_results(run_dir, data.name, args.coarse_k, data.class_names)
    metrics["methods"] = list(methods)
    metrics["settings"] = {
        "wd_convention": args.wd_convention,
        "weight_decay": args.weight_decay,
        "stopping": args.stopping,
        "ch_rule": args.ch_rule,
        "normalisation": {"mean": mean, "std": std, "images": train_images},
    }
    common.write_json(run_dir / "metrics.json", metrics)
    categories = read_result(run_dir, "categories")
    if categories is not None:
        text = categories_text(categories, data.class_names, args.coarse_k, ctx["fine"]["train"], purity_by_level)
        common.atomic_write_bytes(run_dir / "coarse_categories.md", text.encode())
    if metrics["coarse_per_category_accuracy"]:
        text = per_category_text(metrics["coarse_per_category_accuracy"])
        common.atomic_write_bytes(run_dir / "coarse_accuracy_per_category.md", text.encode())
    for key, info in metrics["accuracy"].items():
        line = f"{key}: train {fmt(info['train'])} / val {fmt(info['val'])} / test {fmt(info['test'])} %"
        if "epoch_seconds_median" in info:
            line += (
                f"; {info['epochs']} epochs, median {info['epoch_seconds_median']:.2f} s/epoch "
                f"({info['train_images_per_s_median']:.0f} train images/s)"
            )
        print(line + (" (degenerate coarse categories)" if info.get("degenerate") else ""))
    print(f"wrote {run_dir} (Tables I-VII beside the paper's: python tools/results_table.py --run DIR)")
    return metrics


def read_result(run_dir, name):
    path = run_dir / name / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def collect_results(run_dir, dataset, k, class_names):
    """metrics.json's content from every finished stage of the run directory (whichever calls made them)."""
    rows, sweep, degenerate = {}, {}, {}
    for key in ("baseline", "pretrain", "coarse_ch", "main_ch", "coarse_cvc", "main_cvc", "ete"):
        result = read_result(run_dir, key)
        if result is not None:
            rows[key] = result
    for loss in ("eq3", "eq4"):
        runs = [json.loads(p.read_text()) for p in run_dir.glob(f"ete_{loss}_x*/result.json")]
        if not runs:
            continue
        runs.sort(key=lambda r: r["diversity"]["scale"])
        selected = select_on_validation(runs)
        sweep[loss] = {
            "selected_scale": None if selected is None else selected["diversity"]["scale"],
            "runs": [
                {
                    **r["diversity"],
                    **{s: r[s] for s in ("train", "val", "test")},
                    "val_used_over_1pct": r["usage"]["val"]["used_over_1pct"],
                    "train_used": r["usage"]["train"]["used"],
                }
                for r in runs
            ],
        }
        if selected is None:
            print(
                f"warning: ETE {loss}: no diversity weight keeps two categories alive on validation",
                file=sys.stderr,
                flush=True,
            )
        else:
            rows[f"ete_{loss}"] = selected
    metrics = {"dataset": dataset, "coarse_k": k}
    categories = read_result(run_dir, "categories")
    if categories is not None:
        assignment = np.asarray(categories["assignment"])
        metrics["ch_hierarchy"] = {
            **{key: v for key, v in categories.items() if key != "cvc"},
            "categories": {str(c + 1): [class_names[f] for f in np.flatnonzero(assignment == c)] for c in range(k)},
        }
        metrics["cvc_categories"] = {
            split: balance_report(np.bincount(v, minlength=k)) for split, v in categories["cvc"].items()
        }
        degenerate["ch"] = degenerate_check("CH", np.bincount(assignment, minlength=k), "fine labels")
        degenerate["cvc"] = degenerate_check("CVC", metrics["cvc_categories"]["train"]["counts"], "training images")
    ete_runs = {key: rows[key] for key in ("ete",) if key in rows}
    for p in sorted(run_dir.glob("ete_eq*_x*/result.json")):
        ete_runs[p.parent.name] = json.loads(p.read_text())
    for key, r in ete_runs.items():
        degenerate[key] = degenerate_check(f"ETE {key}", r["usage"]["train"]["counts"], "training images")
    degenerate = {key: v for key, v in degenerate.items() if v is not None}
    for key, row in rows.items():
        kind = "ch" if key.endswith("_ch") else "cvc" if key.endswith("_cvc") else None
        if key.startswith("ete"):
            kind = ete_stage_name(row["diversity"]["loss"], row["diversity"]["scale"])
        row["degenerate"] = kind in degenerate

    nested = ("hierarchical", "usage", "per_category")
    metrics["accuracy"] = {key: {n: v for n, v in row.items() if n not in nested} for key, row in rows.items()}
    metrics["hierarchical"] = {key: row["hierarchical"] for key, row in rows.items() if "hierarchical" in row}
    metrics["coarse_per_category_accuracy"] = {
        key.split("_")[1]: row["per_category"] for key, row in rows.items() if "per_category" in row
    }
    if "ete" in rows:
        metrics["ete_coarse_usage"] = rows["ete"]["usage"]
    metrics["ete_usage"] = {key: r["usage"] for key, r in ete_runs.items()}
    metrics["ete_sweep"] = sweep
    metrics["degenerate"] = degenerate
    metrics["epoch_seconds_median"] = {key: v.get("epoch_seconds_median") for key, v in rows.items()}
    metrics["paper_cifar100"] = {key: dict(zip(("train", "val", "test"), v)) for key, v in PAPER_ACCURACY.items()}
    metrics["paper_epochs"] = PAPER_EPOCHS
    return metrics


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def categories_text(categories, class_names, k, train_fine, purity_by_level):
    """The CH categories (Table II) with every restart's balance, and the CVC categories."""
    names = class_names
    hierarchy = np.asarray(categories["assignment"])
    lines = [
        "# CH category hierarchy (like Table II)",
        "",
        (
            f"Rule --ch-rule {categories['ch_rule']}; restart {categories['chosen_restart']} of "
            f"{len(categories['restarts'])} kept (most balanced on the training split)."
        ),
        "",
        "| coarse category | fine labels | names |",
        "|---|---|---|",
    ]
    for c in range(k):
        members = [names[f] for f in np.flatnonzero(hierarchy == c)]
        lines.append(f"| {c + 1} | {len(members)} | {', '.join(members) or '(empty)'} |")
    lines += ["", "| restart | labels per category | normalised entropy | empty |", "|---|---|---|---|"]
    for r in categories["restarts"]:
        lines.append(f"| {r['restart']} | {r['counts']} | {r['normalised_entropy']:.3f} | {r['empty']} |")
    if purity_by_level:
        lines += [
            "",
            "Purity against the dataset's built-in levels (share of fine labels whose category's "
            "majority parent is their own): " + ", ".join(f"{lvl} {p:.2f}" for lvl, p in purity_by_level.items()),
        ]
    lines += [
        "",
        "# CVC coarse visual categories (per image, training split)",
        "",
        "| coarse category | images | most frequent fine labels (images) |",
        "|---|---|---|",
    ]
    cvc_train = torch.as_tensor(categories["cvc"]["train"])
    for c in range(k):
        members = train_fine[cvc_train == c]
        counts = np.bincount(members.numpy(), minlength=len(names))
        top = [f"{names[f]} ({counts[f]})" for f in np.argsort(-counts)[:5] if counts[f] > 0]
        lines.append(f"| {c + 1} | {len(members)} | {', '.join(top) or '(empty)'} |")
    return "\n".join(lines) + "\n"


def per_category_text(per_category):
    lines = ["# Coarse network accuracy per coarse category (like Fig. 3)", ""]
    for kind, splits in per_category.items():
        k = len(splits["test"])
        lines += [
            f"## {kind.upper()}",
            "",
            "| split | " + " | ".join(str(c + 1) for c in range(k)) + " |",
            "|---|" + "---|" * k,
        ]
        for split, accs in splits.items():
            lines.append(f"| {split} | " + " | ".join(fmt(a) for a in accs) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
