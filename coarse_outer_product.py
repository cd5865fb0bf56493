"""Coarse network x VGG16 features by outer product, with CH / CVC / ETE coarse categories.

Paper: a CIFAR-100 course-project report asking whether hierarchical classification helps
("Can hierarchical classification improve the classification accuracy of neural networks when
the number of categories is large?"; ../shared/papers/coarse_outer_product.txt).

What it reproduces (Tables I-VII, Fig. 1-4):
- baseline: VGG16 with batch norm after every convolution and two dropout layers before the three
  linear layers (Table I);
- the composite of Fig. 1: a frozen VGG13 coarse network gives K=10 softmax probabilities; their
  outer product with the 512 VGG16 convolutional features (K x 512 = 5120 inputs) feeds the VGG16
  classification layers, which predict the fine classes. The coarse network is trained first;
- three ways to build the K coarse categories (--method ch|cvc|ete, or all):
  CH  (Table II-IV): an early-stopped VGG16 gets, on its frozen 100-way output, batch norm, a
      K-unit ReLU "coarse layer" and a 100-unit "recovery layer" (L1 0.005 on its weights),
      trained with cross-entropy (Fig. 2); each fine label goes to the coarse neuron its training
      images activate most. Several restarts of the two layers; the most balanced hierarchy
      (label counts, measured on the training split only) is kept, as the paper "selects the one
      that has a roughly balanced fine label distribution";
  CVC (Table V-VI): the same network, each image gets the neuron it activates most;
  ETE (Table VII, Fig. 4): shared VGG16 convolutions, the three VGG13 linear layers with a softmax
      as the coarse head, trained end to end with no hierarchy, optionally with the diversity
      losses of Eq. 3 (Mexican hat plus overlap) or Eq. 4 (lambda sum_{i!=j} o_i^T o_j).
      We report how many coarse categories are actually used (the paper saw all images in one).
- protocol: per-channel zero mean / unit std, random flip and pad-4 crop, a seeded per-run
  stratified train/validation split (400/100 per class on CIFAR-100), SGD momentum 0.9, lr 0.01
  times 0.3 when the validation loss has not decreased for 5 consecutive epochs, L2 1e-3.

Outputs in the run directory: metrics.json (every number), accuracy_table.md (train/val/test of
every network, next to the paper's CIFAR-100 numbers), coarse_categories.md (the CH categories with
class names like Table II, the CVC categories by their most frequent labels, balance of every
restart), coarse_accuracy_per_category.md (Fig. 3: the coarse network's accuracy per category),
and the ETE coarse-category usage (in metrics.json and accuracy_table.md).

Command (the paper's settings, CIFAR-100 under --data-dir):
    python coarse_outer_product.py --dataset cifar100 --data-dir data --method all
Smoke run:
    python coarse_outer_product.py --dry-run --image-size 32 --train-size 600 --test-size 200 --val-per-class 2 --device cpu

Paper vs ours (ambiguities and deviations):
- Epochs: the paper stops after 81 (baseline), 66 (CH), 76 (CVC), 67 (ETE) and 31/32 (coarse
  networks) epochs without saying why; we train --epochs 80 for the fine networks and
  --coarse-epochs 30 for the coarse networks and report the last epoch's weights.
- "Early stopping" of the VGG16 used to build CH/CVC: stop when the validation loss has not
  decreased for --early-stop-patience 5 epochs (at most --pretrain-epochs 80) and keep the weights
  of the best validation loss. The paper gives no patience.
- The recovery layers' training length (--recovery-epochs 10), the number of restarts to pick a
  balanced hierarchy from (--ch-restarts 3) and the balance measure (normalised entropy of the
  number of fine labels per coarse category) are ours; the paper picks "roughly balanced" by hand.
  The restart picked by CH balance is used for CVC too (the paper uses "the same network").
- "Activated the most by the images of this label": we sum the coarse-layer activations over the
  label's images and take the largest neuron. The coarse layer's activations are taken on the
  training split (400 per class), not on train+validation, so the validation set stays unused.
- CVC coarse labels of the validation and test images come from the same frozen network (needed to
  report the coarse network's validation/test accuracy as Table V does).
- Classification layers: dropout, linear 512, ReLU, dropout, linear 512, ReLU, linear (the
  CIFAR VGG of the paper's base code; "two dropout layers before the linear layers"); dropout 0.5.
  The coarse networks use the same three layers with K outputs. Batch size 128 (not given).
- Pad-4 crop pads with black (0) before normalisation, as torchvision's RandomCrop does; the
  channel statistics are those of the whole training set (train + validation).
- Eq. 3 / Eq. 4 lambdas are not given in the paper; defaults: lambda1 1e-3, lambda2 3e-3
  (the Mexican hat's minimum ||sigma_c||^2 = 1/(2 lambda2) ~ 167, about (128/10)^2, i.e. a
  batch of 128 spread evenly over 10 confident categories), lambda3 1e-4, lambda4 1e-4 (Eq. 4 is a
  sum over ~16k pairs for a batch of 128). The losses act on the softmax outputs of the coarse
  head, per mini-batch, summed (not averaged) as written. Default --diversity none is Table VII.
- Train accuracy is measured in evaluation mode on the un-augmented training split.
- Non-CIFAR-100 data: --coarse-k sets K (10 as the paper). We use K=12 on shapes (72 classes; the
  number of its shape x fill classes) and K=2 on CIFAR-10 (5 fine classes per coarse category, and
  the built-in vehicles/animals split to compare with); coarse_categories.md gives the purity of
  the CH categories against the dataset's built-in levels.
- Not done: CIFAR-100 is not available offline here; its loader is common.load_cifar100.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import common

METHODS = ("baseline", "ch", "cvc", "ete")

# The paper's CIFAR-100 accuracies (train, validation, test), Tables I, III-VII and the text.
PAPER_ACCURACY = {
    "baseline": (94.37, 69.03, 68.74),
    "pretrain": (67.77, 62.50, None),
    "coarse_ch": (82.09, 75.90, 75.88),
    "main_ch": (84.46, 69.90, 65.45),
    "coarse_cvc": (81.92, 77.72, 77.61),
    "main_cvc": (85.01, 67.22, 65.71),
    "ete": (92.56, 68.94, 68.42),
}
ROW_NAMES = {
    "baseline": "VGG16 baseline",
    "pretrain": "VGG16 early-stopped (builds CH/CVC)",
    "coarse_ch": "CH coarse network (VGG13)",
    "main_ch": "CH outer-product network",
    "coarse_cvc": "CVC coarse network (VGG13)",
    "main_cvc": "CVC outer-product network",
    "ete": "ETE end-to-end network",
}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, epochs=80, batch_size=128, lr=0.01, dataset="shapes")
    g = parser.add_argument_group("coarse_outer_product")
    g.add_argument("--method", default="all", choices=METHODS + ("all",), help="which networks to train")
    g.add_argument("--coarse-k", type=common.positive_int, default=10, help="number of coarse categories K")
    g.add_argument(
        "--val-per-class", type=common.positive_int, default=100, help="validation images per class (400/100 split)"
    )
    g.add_argument("--momentum", type=common.fraction, default=0.9)
    g.add_argument("--weight-decay", type=common.nonneg_float, default=1e-3, help="L2 regularisation")
    g.add_argument(
        "--lr-factor", type=common.positive_fraction, default=0.3, help="lr factor on a validation-loss plateau"
    )
    g.add_argument("--lr-patience", type=common.positive_int, default=5, help="epochs without a lower validation loss")
    g.add_argument("--hidden", type=common.positive_int, default=512, help="width of the two hidden linear layers")
    g.add_argument("--dropout", type=common.fraction, default=0.5)
    g.add_argument("--coarse-epochs", type=common.positive_int, default=30, help="epochs of the VGG13 coarse networks")
    g.add_argument(
        "--pretrain-epochs",
        type=common.positive_int,
        default=80,
        help="at most this many epochs of the early-stopped VGG16",
    )
    g.add_argument("--early-stop-patience", type=common.positive_int, default=5)
    g.add_argument(
        "--recovery-epochs", type=common.positive_int, default=10, help="epochs of the coarse + recovery layers"
    )
    g.add_argument("--recovery-l1", type=common.nonneg_float, default=0.005, help="L1 on the recovery layer's weights")
    g.add_argument(
        "--ch-restarts", type=common.positive_int, default=3, help="recovery-layer restarts; the most balanced is kept"
    )
    g.add_argument("--diversity", default="none", choices=("none", "eq3", "eq4"), help="ETE diversity loss")
    g.add_argument("--lambda1", type=common.nonneg_float, default=1e-3, help="Eq. 3: weight of the Mexican hat")
    g.add_argument("--lambda2", type=common.nonneg_float, default=3e-3, help="Eq. 3: quartic coefficient of the hat")
    g.add_argument("--lambda3", type=common.nonneg_float, default=1e-4, help="Eq. 3: weight of the overlap term")
    g.add_argument("--lambda4", type=common.nonneg_float, default=1e-4, help="Eq. 4: lambda")
    # A resume may lengthen --epochs (stages nothing builds on), not the coarse, pre-training or
    # recovery stages that later stages are trained from.
    args = common.parse_args(parser, argv, script="coarse_outer_product")
    if args.coarse_k < 2:
        parser.error("--coarse-k must be at least 2")
    return args


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


def ch_assignment(activations, labels, num_classes):
    """CH: fine label f -> the coarse neuron with the largest activation summed over f's images.

    activations: N x K coarse-layer outputs; labels: N fine labels. Returns num_classes labels."""
    totals = torch.zeros(num_classes, activations.shape[1], dtype=activations.dtype)
    totals.index_add_(0, labels.long(), activations)
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


def purity(assignment, parents):
    """Share of fine classes whose coarse category's majority built-in parent is their own parent."""
    assignment, parents = np.asarray(assignment), np.asarray(parents)
    agree = 0
    for c in np.unique(assignment):
        agree += np.bincount(parents[assignment == c]).max()
    return float(agree / len(assignment))


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


def train_stage(ctx, name, model, loss_fn, train_loader, validate, epochs, params=None, early_stopping=False):
    """One training stage through common.fit: SGD momentum, L2, lr x factor on a validation-loss
    plateau (checkpointed with the stage), optional early stopping with the best weights restored.

    validate() -> {"val_loss": ..., ...}. Returns (model, {"epochs": ..., "best_epoch": ...})."""
    args, run_dir, device = ctx["args"], ctx["run_dir"], ctx["device"]
    stage_dir = run_dir / name
    log_path = run_dir / "metrics.jsonl"
    params = list(model.parameters()) if params is None else list(params)
    optimizer = common.make_sgd(params, args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    plateau = common.ReduceOnPlateau(args.lr, factor=args.lr_factor, patience=args.lr_patience)
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
        model.load_state_dict(common.load_checkpoint(stopper.best_path, device))
    model.eval()
    records = [r for r in common.read_jsonl(log_path) if r.get("stage") == name]
    info.setdefault("epochs", max((r["epoch"] for r in records), default=0))
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
    """Train (eval mode, no augmentation), validation and test accuracy, as the paper's tables."""
    return {split: loss_and_accuracy(ctx, forward, split, targets[split])[1] for split in ("train", "val", "test")}


def classification_loss(model, x, y):
    return common.cross_entropy_loss(model, x, y)


def train_fine_network(ctx, name, model, params=None, epochs=None, early_stopping=False):
    """Train a fine classifier (baseline, early-stopped VGG16, or an outer-product net)."""
    fine = ctx["fine"]
    model = common.to_device_model(model, ctx["device"])
    loader = ctx["train_loader"](fine["train"])
    model, info = train_stage(
        ctx,
        name,
        model,
        classification_loss,
        loader,
        validator(ctx, model, fine),
        epochs or ctx["args"].epochs,
        params=params,
        early_stopping=early_stopping,
    )
    return model, {**info, **split_accuracies(ctx, model, fine)}


def train_recovery_layers(ctx, pretrained, restart):
    """Fig. 2: train the batch norm, coarse layer and recovery layer on the frozen VGG16."""
    args, fine = ctx["args"], ctx["fine"]
    torch.manual_seed(args.seed * 1000 + restart)  # each restart its own initialisation
    net = common.to_device_model(CoarseProjectionNet(pretrained, ctx["num_classes"], args.coarse_k), ctx["device"])
    trainable = [p for n, p in net.named_parameters() if not n.startswith("vgg.")]

    def loss_fn(model, x, y):
        logits = model(x)
        ce = F.cross_entropy(logits.float(), y)
        l1 = args.recovery_l1 * model.recovery_layer.weight.abs().sum()
        return ce + l1, {"correct": (logits.argmax(1) == y).sum(), "l1": l1}

    net, info = train_stage(
        ctx,
        f"recovery_{restart}",
        net,
        loss_fn,
        ctx["train_loader"](fine["train"]),
        validator(ctx, net, fine),
        args.recovery_epochs,
        params=trainable,
    )
    return net, info


def build_coarse_categories(ctx, pretrained):
    """CH label hierarchy and CVC per-image categories from the most balanced restart."""
    args = ctx["args"]
    restarts = []
    for r in range(args.ch_restarts):
        net, info = train_recovery_layers(ctx, pretrained, r)
        activations, index = run_outputs(ctx, net.coarse_activations, "train_full")
        hierarchy = ch_assignment(activations, ctx["fine"]["train"][index], ctx["num_classes"])
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
        "chosen_restart": chosen["restart"],
        "restarts": [
            {"restart": r["restart"], **r["balance"], "hierarchy": r["hierarchy"].tolist(), "training": r["info"]}
            for r in restarts
        ],
    }
    return chosen["hierarchy"], cvc, report


def train_coarse_then_main(ctx, kind, coarse_targets):
    """Train the VGG13 coarse network on the coarse labels, freeze it, train the outer-product net."""
    args = ctx["args"]
    k = args.coarse_k
    coarse_net = common.to_device_model(make_vgg(13, k, hidden=args.hidden, dropout=args.dropout), ctx["device"])
    coarse_net, coarse_info = train_stage(
        ctx,
        f"coarse_{kind}",
        coarse_net,
        classification_loss,
        ctx["train_loader"](coarse_targets["train"]),
        validator(ctx, coarse_net, coarse_targets),
        args.coarse_epochs,
    )
    coarse_info.update(split_accuracies(ctx, coarse_net, coarse_targets))
    per_category = {}
    for split in ("val", "test"):
        logits, index = run_outputs(ctx, coarse_net, split)
        per_category[split] = per_category_accuracy(logits, coarse_targets[split][index], k)
    main_net = make_vgg(16, ctx["num_classes"], k * 512, args.hidden, args.dropout)
    composite = OuterProductNet(coarse_net, main_net)
    composite, main_info = train_fine_network(ctx, f"main_{kind}", composite, params=main_net.parameters())
    return coarse_info, main_info, per_category


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


def train_end_to_end(ctx):
    args, fine = ctx["args"], ctx["fine"]
    model = common.to_device_model(
        EndToEndNet(ctx["num_classes"], args.coarse_k, args.hidden, args.dropout), ctx["device"]
    )

    def loss_fn(model, x, y):
        logits, coarse = model.forward_with_coarse(x)
        ce = F.cross_entropy(logits.float(), y)
        with torch.autocast(ce.device.type, enabled=False):  # batch sums of up to B^2 terms: keep fp32
            if args.diversity == "eq3":
                diversity = diversity_eq3(coarse.float(), args.lambda1, args.lambda2, args.lambda3)
            elif args.diversity == "eq4":
                diversity = diversity_eq4(coarse.float(), args.lambda4)
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

    model, info = train_stage(ctx, "ete", model, loss_fn, ctx["train_loader"](fine["train"]), validate, args.epochs)
    info.update(split_accuracies(ctx, model, fine))
    usage = {split: coarse_usage(ctx, model, split) for split in ("train", "val", "test")}
    return info, usage


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def accuracy_table(rows, dataset, ete_usage, diversity):
    lines = [
        f"# Accuracy (%) on {dataset}" + (" (JPEG q75 copy)" if dataset == "cifar10" else ""),
        "",
        "| network | epochs | train | validation | test | paper train / val / test (CIFAR-100) |",
        "|---|---|---|---|---|---|",
    ]
    for key, info in rows.items():
        paper = " / ".join(fmt(v) for v in PAPER_ACCURACY[key])
        name = ROW_NAMES[key] + (f" (diversity {diversity})" if key == "ete" else "")
        epochs = f"{info.get('epochs', '-')}" + (f" (best {info['best_epoch']})" if "best_epoch" in info else "")
        lines.append(
            f"| {name} | {epochs} | {fmt(info['train'])} | {fmt(info['val'])} | {fmt(info['test'])} | {paper} |"
        )
    if ete_usage:
        lines += ["", "ETE coarse categories actually used (argmax of the coarse softmax):", ""]
        for split, u in ete_usage.items():
            lines.append(
                f"- {split}: {u['used']} used ({u['used_over_1pct']} with >= 1% of the images), "
                f"counts {u['counts']}, mean max probability {u['mean_max_prob']:.3f}"
            )
    return "\n".join(lines) + "\n"


def categories_text(ctx, hierarchy, cvc, report):
    names, k = ctx["class_names"], ctx["args"].coarse_k
    lines = []
    if hierarchy is not None:
        lines += [
            "# CH category hierarchy (like Table II)",
            "",
            f"Restart {report['chosen_restart']} of {len(report['restarts'])} kept (most balanced on the training split).",
            "",
            "| coarse category | fine labels | names |",
            "|---|---|---|",
        ]
        for c in range(k):
            members = [names[f] for f in np.flatnonzero(hierarchy.numpy() == c)]
            lines.append(f"| {c + 1} | {len(members)} | {', '.join(members) or '(empty)'} |")
        lines += ["", "| restart | labels per category | normalised entropy | empty |", "|---|---|---|---|"]
        for r in report["restarts"]:
            lines.append(f"| {r['restart']} | {r['counts']} | {r['normalised_entropy']:.3f} | {r['empty']} |")
        if report.get("purity"):
            lines += [
                "",
                "Purity against the dataset's built-in levels (share of fine labels whose category's "
                "majority parent is their own): " + ", ".join(f"{lvl} {p:.2f}" for lvl, p in report["purity"].items()),
            ]
    if cvc is not None:
        lines += [
            "",
            "# CVC coarse visual categories (per image, training split)",
            "",
            "| coarse category | images | most frequent fine labels (images) |",
            "|---|---|---|",
        ]
        train_fine = ctx["fine"]["train"]
        for c in range(k):
            members = train_fine[cvc["train"] == c]
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


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "coarse_outer_product")
    if args.dry_run:
        args.coarse_epochs = args.pretrain_epochs = args.recovery_epochs = 1
    methods = METHODS if args.method == "all" else (args.method,)
    data = common.load_data(args)
    if data.train.images.shape[-1] < 32:
        common.fail(f"VGG's five max-pools need images of at least 32 pixels; got {data.train.images.shape[-1]}")
    if args.coarse_k > data.num_classes:
        common.fail(f"--coarse-k {args.coarse_k} is more than the {data.num_classes} fine classes")

    # The per-run, seeded, class-balanced train/validation split (400/100 per class on CIFAR-100).
    val_idx, train_idx = common.stratified_split(data.train.labels.numpy(), args.val_per_class, seed=args.seed)
    splits = {"train": data.train.subset(train_idx), "val": data.train.subset(val_idx), "test": data.test}
    max_batches = 2 if args.dry_run else None

    def train_loader(labels):
        return common.GpuLoader(
            splits["train"].images,
            labels,
            args.batch_size,
            device=device,
            mean=data.mean,
            std=data.std,
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
            split.images, labels, args.batch_size, device=device, mean=data.mean, std=data.std, max_batches=max_batches
        )
        # CH/CVC need the coarse activations of every image, so "_full" is never truncated by --dry-run.
        eval_loaders[name + "_full"] = eval_loaders[name]
        if max_batches is not None:
            eval_loaders[name + "_full"] = common.GpuLoader(
                split.images, labels, args.batch_size, device=device, mean=data.mean, std=data.std
            )
    ctx = {
        "args": args,
        "run_dir": run_dir,
        "device": device,
        "train_loader": train_loader,
        "eval_loaders": eval_loaders,
        "fine": {name: s.labels for name, s in splits.items()},
        "num_classes": data.num_classes,
        "class_names": data.class_names,
    }
    print(
        f"{data.name}: {len(splits['train'])} train / {len(splits['val'])} validation / {len(splits['test'])} test "
        f"images, {data.num_classes} classes, K={args.coarse_k}, methods {', '.join(methods)}",
        flush=True,
    )

    rows, per_category, metrics = {}, {}, {"dataset": data.name, "methods": list(methods), "coarse_k": args.coarse_k}
    hierarchy = cvc = ete_usage = None
    report = {}
    if "baseline" in methods:
        _, rows["baseline"] = train_fine_network(
            ctx, "baseline", make_vgg(16, data.num_classes, 512, args.hidden, args.dropout)
        )
    if "ch" in methods or "cvc" in methods:
        pretrained, rows["pretrain"] = train_fine_network(
            ctx,
            "pretrain",
            make_vgg(16, data.num_classes, 512, args.hidden, args.dropout),
            epochs=args.pretrain_epochs,
            early_stopping=True,
        )
        hierarchy, cvc, report = build_coarse_categories(ctx, pretrained)
        if data.hierarchy.n_levels > 1:
            report["purity"] = {
                data.hierarchy.level_names[l]: purity(hierarchy.numpy(), data.hierarchy.parents[l])
                for l in range(data.hierarchy.n_levels - 1)
            }
        metrics["ch_hierarchy"] = {
            "assignment": hierarchy.tolist(),
            **report,
            "categories": {
                str(c + 1): [data.class_names[f] for f in np.flatnonzero(hierarchy.numpy() == c)]
                for c in range(args.coarse_k)
            },
        }
        metrics["cvc_categories"] = {
            split: balance_report(np.bincount(v.numpy(), minlength=args.coarse_k)) for split, v in cvc.items()
        }
        for kind in ("ch", "cvc"):
            if kind not in methods:
                continue
            targets = {s: torch.as_tensor(hierarchy)[y] for s, y in ctx["fine"].items()} if kind == "ch" else cvc
            rows[f"coarse_{kind}"], rows[f"main_{kind}"], per_category[kind] = train_coarse_then_main(
                ctx, kind, targets
            )
    if "ete" in methods:
        rows["ete"], ete_usage = train_end_to_end(ctx)
        metrics["ete_coarse_usage"] = ete_usage

    metrics["accuracy"] = rows
    metrics["coarse_per_category_accuracy"] = per_category
    metrics["epoch_seconds_median"] = {k: v.get("epoch_seconds_median") for k, v in rows.items()}
    metrics["paper_cifar100"] = {k: dict(zip(("train", "val", "test"), v)) for k, v in PAPER_ACCURACY.items()}
    common.write_json(run_dir / "metrics.json", metrics)
    table = accuracy_table(rows, data.name, ete_usage, args.diversity)
    common.atomic_write_bytes(run_dir / "accuracy_table.md", table.encode())
    if hierarchy is not None:
        text = categories_text(ctx, hierarchy if "ch" in methods else None, cvc if "cvc" in methods else None, report)
        common.atomic_write_bytes(run_dir / "coarse_categories.md", text.encode())
    if per_category:
        common.atomic_write_bytes(run_dir / "coarse_accuracy_per_category.md", per_category_text(per_category).encode())
    print(table)
    for key, info in rows.items():
        if "epoch_seconds_median" in info:
            print(
                f"{key}: {info['epochs']} epochs, median {info['epoch_seconds_median']:.2f} s/epoch "
                f"({info['train_images_per_s_median']:.0f} train images/s)"
            )
    print(f"wrote {run_dir}")
    return metrics


if __name__ == "__main__":
    main()
