"""Hierarchical Deep Loss (HDL): a cascade of per-level linear layers plus a center loss on a ResNet-18.

Paper: "Learn class hierarchy using convolutional neural networks" (../shared/papers/hdl_stack.txt).
Reproduces experiment 2 / Table 4 (shapes: fill, outline, shape at 100%) and experiment 6 / Table 3
(CIFAR-100, WordNet levels of 12 / 6 / 2 categories, baseline ResNet-18 vs HDL). The full account of
every reading and deviation, and the commands: docs/hdl_stack.md.

    python hdl_stack.py --out-dir runs/hdl_shapes             # shapes, baseline + HDL, 20 epochs
    python hdl_stack.py --dataset cifar100 --data-dir data    # experiment 6, Table 3 row 1 (800 epochs)
    python tools/results_table.py --sweep-table runs/sweep    # a lambda0 sweep's table and SWEEP_RULE's pick

Pipeline (main): levels of the class hierarchy -> data (optional validation split) -> the baseline
ResNet-18 (fine cross-entropy) -> HDL from the same initialisation and batch order:

    L = lambda0 * L_center + lambda_fine * CE_fine + sum_l lambda_l * CE_l     (eq. 4-5, all lambdas 1)
    L_center = mean_i || x_i - c_{y_i} ||^2        (eq. 1), class centres moved to the epoch's class means

then the last epoch on the test set, once; metrics.json, metrics.jsonl, levels.json (Reports; Tables 3 and 4
beside the paper's: python tools/results_table.py --run RUN_DIR).

Paper vs ours, one line per decision (docs/hdl_stack.md, "Paper vs ours", has the reasoning):
- topology: a chain, finest level first, from the fine logits (CIFAR) or the pooled features (shapes): HDLNet, --heads
- no activation after a layer with a cross-entropy; ReLU after the hidden 100 / 10 / 4: LevelStack
- stack widths: experiment 6's on CIFAR-100, one FC per level elsewhere: stack_hidden_sizes, --stack-hidden
- fine classifier kept on CIFAR, removed on shapes (then the heads' joint argmax): --fine-head, fine_scores_from_levels
- shapes rendered at 64 px (the paper: 128 rescaled to 64); fill and outline are not a tree: make_levels
- CIFAR-100's WordNet mapping is not given: two readings derived offline, tables at the end: --levels
- center loss as a batch mean, fine-class centres from zero, moved per epoch: center_loss, end_of_epoch_centers
- the paper's center-loss setting stalls early training; Wen's / SGD / normalised variants are flags: --center-*
- a short sweep cannot choose Table 3's setting; SWEEP_RULE picks one extra 800-epoch row, ours: tools/results_table.py
- Adam lr 0.001 constant, batch 64, 800 epochs (CIFAR) / 20 (shapes, not given): get_args, default_epochs
- no normalisation; crop + flip on CIFAR only: --normalize, --augment
- stem: Table 3's is the CIFAR code's 3x3/1 (tested: README), the 7x7 elsewhere; PreAct-101/152 absent: --stem
- no validation in the paper, nothing selected; --val-fraction reports on a held-out split only: validation_split
- extras: summed-fine level errors, majority-category errors, violation rates: level_results
- not reproduced: VQA-Med, Animals Taxonomy8, ImageNet (experiments 1, 3-5): no data here
"""

import argparse
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# Table 4: shapes at 100% on every level (fill 6, outline 6, shape 2) for every learning rate. Recorded in a
# shapes run's metrics.json ("paper"), as before the report moved out (the smoke run's golden record holds it);
# every paper number the tables use, this one too, is in tools/results_table.py.
PAPER_SHAPES_ACCURACY = {"fill": 100.0, "outline": 100.0, "shape": 100.0}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    # epochs=None: resolved per dataset in main (shapes 20, otherwise experiment 6's 800).
    common.add_common_args(parser, epochs=None, batch_size=64, lr=0.001, dataset="shapes")
    g = parser.add_argument_group("hdl_stack")
    p = parser.add_argument_group("paper fidelity and ablations (every default is the paper's; docs/hdl_stack.md)")
    nonneg, text, cu = common.nonneg_float, common.nonempty, ("epoch", "wen", "sgd")
    g.add_argument("--method", default="both", choices=("both", "baseline", "hdl"), help="Table 3 needs both")
    g.add_argument("--arch", default="resnet18", choices=("resnet18", "preact_resnet18"))
    p.add_argument("--stem", default="auto", choices=("auto", "imagenet", "cifar"), help="auto: cifar on CIFAR")
    p.add_argument("--stack-hidden", type=text, default="auto", help="widths, finest first: 100,10,4; none; auto")
    p.add_argument("--levels", default=DEFAULT_LEVELS, choices=tuple(WORDNET_TABLES), help="CIFAR-100's WordNet")
    p.add_argument("--lambda-center", type=nonneg, default=1.0, help="lambda0, the center-loss weight")
    p.add_argument("--lambda-fine", type=nonneg, default=1.0, help="weight of the fine classifier's cross-entropy")
    p.add_argument("--lambda-levels", type=nonneg, nargs="+", default=[1.0], help="finest first; one value: all")
    p.add_argument("--heads", default="cascade", choices=("cascade", "parallel"), help="chain, or all on the features")
    p.add_argument("--fine-head", default="auto", choices=("auto", "on", "off"), help="auto: off on shapes only")
    p.add_argument("--center-update", default="epoch", choices=cu, help="per epoch (paper), Wen et al., or SGD")
    p.add_argument("--center-features", default="raw", choices=("raw", "normalized"), help="raw: the paper's")
    p.add_argument("--center-alpha", type=common.positive_float, default=None, help="rate; default epoch 1, else 0.5")
    p.add_argument("--augment", default="auto", choices=("auto", "none", "crop-flip"), help="auto: crop-flip on CIFAR")
    p.add_argument("--normalize", action="store_true", help="normalise by the channel mean / std (the paper does not)")
    g.add_argument("--val-fraction", type=common.fraction, default=0.0, help="hold out; report on it, not on test")
    g.add_argument("--eval-batch-size", type=common.positive_int, default=500)
    # A run from before --stem trained the 7x7, the only stem there was.
    args = common.parse_args(parser, argv, script="hdl_stack", before_flags={"stem": "imagenet"})
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Range checks get_args leaves to after parsing; fills in --center-alpha's default per update rule and
    --stem's per dataset (the 3x3 stem on CIFAR: Table 3's, by the README's stem test; the 7x7 elsewhere) and
    --fine-head's (off on shapes without a --hierarchy file, whose levels tell the classes apart; else on)."""
    if args.stem == "auto":
        args.stem = "cifar" if args.dataset in ("cifar10", "cifar100") else "imagenet"
    if args.fine_head == "auto":
        args.fine_head = "off" if args.dataset == "shapes" and not args.hierarchy else "on"
    if args.center_alpha is None:
        args.center_alpha = 1.0 if args.center_update == "epoch" else 0.5
    if args.center_update == "sgd" and not args.center_alpha > 0:
        parser.error("--center-alpha must be positive")
    if args.center_update != "sgd" and not 0 < args.center_alpha <= 1:
        parser.error("--center-alpha must be in (0, 1]")
    if min([args.lambda_center, args.lambda_fine] + args.lambda_levels) < 0:
        parser.error("loss weights must be non-negative")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")


# ---------------------------------------------------------------------------------------
# The method: the level stacks and the centres (HDLNet), the losses (eq. 1, 5), the centre updates, training
# ---------------------------------------------------------------------------------------


class LevelStack(nn.Sequential):
    """One hierarchy level's stack: [FC hidden, ReLU,] FC to the level's classes (no activation)."""

    def __init__(self, in_features, num_classes, hidden=None):
        layers = (
            [nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)]
            if hidden
            else [nn.Linear(in_features, num_classes)]
        )
        super().__init__(*layers)


class HDLNet(nn.Module):
    """A backbone, its optional fine classifier, one LevelStack per level, and the class centres.

    heads='cascade' (the paper's): the stacks form a chain, finest level first; the first stack
    reads the fine logits (or the pooled features when there is no fine classifier) and every
    later stack reads the previous level's logits. heads='parallel': every stack and the fine
    classifier read the pooled features.

    forward(x) -> (pooled features, fine logits or None, [level logits, finest level first]).
    The centres (one per fine class, in the center-loss feature space) are buffers, so they are
    checkpointed with the model; center_sum / center_count accumulate an epoch's features for
    the per-epoch update."""

    def __init__(self, backbone, num_fine, level_sizes=(), hidden_sizes=None, heads="cascade", fine_head=True):
        super().__init__()
        if heads not in ("cascade", "parallel"):
            raise ValueError(f"heads must be 'cascade' or 'parallel', got {heads!r}")
        if not fine_head and not level_sizes:
            raise ValueError("a model without a fine classifier needs level heads")
        self.backbone, self.heads, self.fine_head = backbone, heads, fine_head
        dim = backbone.head.fc.in_features
        if not fine_head:
            backbone.head.fc = nn.Identity()  # section 4.1: the level layers replace the output layer
        hidden_sizes = hidden_sizes or [None] * len(level_sizes)
        if heads == "cascade":
            inputs = [num_fine if fine_head else dim] + list(level_sizes[:-1])
        else:
            inputs = [dim] * len(level_sizes)
        self.stacks = nn.ModuleList(LevelStack(i, n, h) for i, n, h in zip(inputs, level_sizes, hidden_sizes))
        self.register_buffer("centers", torch.zeros(num_fine, dim))
        self.register_buffer("center_sum", torch.zeros(num_fine, dim))
        self.register_buffer("center_count", torch.zeros(num_fine))
        # Under --distributed ddp each rank keeps its own sums (DDP would overwrite them with rank
        # 0's at every forward); the updates below add them over the ranks, so the centres stay
        # the same on every rank and equal one process's at the global batch.
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self, ["centers", "center_sum", "center_count"]
        )

    def forward(self, x):
        features = self.backbone.features(x)
        fine_logits = self.backbone.head.fc(features) if self.fine_head else None
        level_logits = []
        if self.heads == "cascade":
            h = fine_logits if self.fine_head else features
            for stack in self.stacks:
                h = stack(h)
                level_logits.append(h)
        else:
            level_logits = [stack(features) for stack in self.stacks]
        return features, fine_logits, level_logits

    @torch.no_grad()
    def accumulate_centers(self, features, labels):
        """Add a batch's features to the epoch's per-class sums (in place, so a CUDA graph can replay it)."""
        self.center_sum.index_add_(0, labels, features.detach().float())
        self.center_count.index_add_(0, labels, torch.ones_like(labels, dtype=self.center_count.dtype))

    @torch.no_grad()
    def update_centers(self, alpha=1.0):
        """End of epoch: move each seen class's centre to (alpha of the way to) its epoch mean; reset the sums."""
        if common.ddp_active():  # every rank's images of the epoch
            torch.distributed.all_reduce(self.center_sum)
            torch.distributed.all_reduce(self.center_count)
        seen = (self.center_count > 0)[:, None]
        mean = self.center_sum / self.center_count.clamp(min=1)[:, None]
        self.centers.copy_(torch.where(seen, self.centers + alpha * (mean - self.centers), self.centers))
        self.center_sum.zero_()
        self.center_count.zero_()

    @torch.no_grad()
    def batch_update_centers(self, features, labels, alpha, rule):
        """Per-batch centre update, in place (CUDA-graph safe).

        rule='wen' (Wen et al. 2016, eq. 4): c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i) / (1 + n_j),
        n_j the batch's images of class j. rule='sgd': one SGD step of rate alpha on the centres of
        mean_i 1/2 ||x_i - c_{y_i}||^2 (gradient w.r.t. c_j: sum_{i: y_i = j} (c_j - x_i) / batch size),
        what the centres get as learned parameters with a separate SGD, free of lambda0."""
        if rule not in ("wen", "sgd"):
            raise ValueError(f"unknown centre update rule {rule!r}")
        diff = torch.zeros_like(self.centers).index_add_(0, labels, self.centers[labels] - features.detach().float())
        count = torch.zeros_like(self.center_count).index_add_(
            0, labels, torch.ones_like(labels, dtype=self.center_count.dtype)
        )
        if common.ddp_active():  # the global batch: every rank's images (no CUDA graph under ddp)
            torch.distributed.all_reduce(diff)
            torch.distributed.all_reduce(count)
        if rule == "wen":
            self.centers.sub_(alpha * diff / (1.0 + count)[:, None])
        else:
            self.centers.sub_(alpha * diff / count.sum())


def center_space(features, kind="raw"):
    """The features the center loss sees: the pooled features as they are (the paper's), or L2-normalised."""
    features = features.float()
    return F.normalize(features, dim=1) if kind == "normalized" else features


def center_loss(features, labels, centers):
    """Eq. 1 as a batch mean: mean_i ||x_i - c_{y_i}||^2 (centres are constants here). Wen et al.'s
    1/2 sum_i ||x_i - c_{y_i}||^2 with weight lambda is this with lambda0 = lambda / 2 (and a batch mean)."""
    return ((features.float() - centers[labels]) ** 2).sum(1).mean()


def hdl_loss(features, fine_logits, level_logits, labels, centers, lambda_center, lambda_fine, lambda_levels):
    """Eq. 5 plus the fine classifier: (total, {part: value}) with
    total = lambda_center * center + lambda_fine * CE_fine + sum_l lambda_levels[l] * CE_l.
    fine_logits None (no fine classifier): no CE_fine term."""
    fine_labels, *level_labels = labels
    parts = {"center": center_loss(features, fine_labels, centers)}
    total = lambda_center * parts["center"]
    if fine_logits is not None:
        parts["ce_fine"] = F.cross_entropy(fine_logits.float(), fine_labels)
        total = total + lambda_fine * parts["ce_fine"]
    for l, (logits, y, weight) in enumerate(zip(level_logits, level_labels, lambda_levels)):
        parts[f"ce_{l + 1}L"] = F.cross_entropy(logits.float(), y)
        total = total + weight * parts[f"ce_{l + 1}L"]
    return total, parts


def make_hdl_loss_fn(
    lambda_center, lambda_fine, lambda_levels, center_update="epoch", center_alpha=1.0, center_features="raw"
):
    """loss_fn(model, x, y) for common.make_train_step. The loss uses the centres as they are before
    this batch; then the centres move: 'epoch' accumulates the batch for the end-of-epoch update,
    'wen' / 'sgd' update them now (HDLNet.batch_update_centers)."""

    def loss_fn(model, x, y):
        features, fine_logits, level_logits = model(x)
        space = center_space(features, center_features)
        total, parts = hdl_loss(
            space, fine_logits, level_logits, y, model.centers, lambda_center, lambda_fine, lambda_levels
        )
        if center_update == "epoch":  # the paper: sum the batch per class, the centres move at the epoch's end
            model.accumulate_centers(space, y[0])
        else:  # Wen et al. / SGD: the centres move now
            model.batch_update_centers(space, y[0], center_alpha, center_update)
        stats = dict(parts)
        stats["feature_norm"] = features.detach().float().norm(dim=1).mean()  # watches the features shrink
        if fine_logits is not None:
            stats["correct"] = (fine_logits.argmax(1) == y[0]).sum()
        for l, (logits, labels) in enumerate(zip(level_logits, y[1:])):
            stats[f"correct_{l + 1}L"] = (logits.argmax(1) == labels).sum()
        return total, stats

    return loss_fn


def end_of_epoch_centers(model, center_update, center_alpha):
    """The paper's per-epoch centre update ("update all class centers after each training epoch"): with
    center_update 'epoch' each seen class's centre moves alpha of the way to its mean over the epoch's
    batches (summed by the loss above); 'wen' / 'sgd' have moved the centres at every batch already."""
    if center_update == "epoch":
        model.update_centers(center_alpha)


def baseline_loss_fn(model, x, y):
    """The plain ResNet-18: cross-entropy on the fine classes only."""
    _, fine_logits, _ = model(x)
    loss = F.cross_entropy(fine_logits.float(), y[0])
    return loss, {"correct": (fine_logits.argmax(1) == y[0]).sum()}


def build_model(args, num_fine, levels, hidden_sizes, device, with_stacks):
    torch.manual_seed(args.seed)  # the baseline and HDL start from the same backbone weights
    backbone = ResNet18(num_fine, stem=args.stem, preact=args.arch == "preact_resnet18")
    model = HDLNet(
        backbone,
        num_fine,
        [l.num_classes for l in levels] if with_stacks else [],
        hidden_sizes if with_stacks else None,
        heads=args.heads,
        fine_head=args.fine_head == "on" if with_stacks else True,
    )
    return common.to_device_model(model, device)


def run_stage(name, args, model, loss_fn, train_loader, loaders, levels, run_dir, device, with_stacks, tree=None):
    """Train one model with common.fit (checkpointed, resumable); return its results on loaders["final"]
    (the validation split with --val-fraction, else the test set), and the outputs behind them.

    The loop common.fit runs, for HDL (loss_fn = make_hdl_loss_fn(...)):

        for epoch in range(args.epochs):
            for x, y in train_loader:                   # Adam step on eq. 5 with the centres before the batch;
                step(x, y)                              # 'epoch': the batch's features summed per class
            evaluate(epoch)                             # --val-fraction only
            end_of_epoch_centers(model, ...)            # on_epoch_end: the centres move to the epoch's means
            checkpoint                                  # the centres are buffers: saved with the model
    """
    optimizer = common.make_adam(model.parameters(), args.lr, device=device)
    # --compile: the loss's four cross-entropies, centre loss and statistics compile with the model (one graph,
    # no break: tests/test_compile_flag.py), not as dozens of small kernels of their own in every step.
    step = common.make_train_step(
        model,
        loss_fn,
        optimizer,
        device=device,
        dtype=args.dtype,
        cuda_graph=args.cuda_graph,
        compile=args.compile,
        compile_loss=True,
    )

    def on_epoch_end(epoch, record):  # common.fit: after the epoch's training and evaluation, before its checkpoint
        if with_stacks:
            end_of_epoch_centers(model, args.center_update, args.center_alpha)
        for key in [k for k in record if k.startswith("correct_")]:  # fit logs counts per batch: to accuracy
            record[f"train_acc_{key[len('correct_') :]}"] = 100.0 * record.pop(key) / train_loader.batch_size

    evaluate = None
    if loaders["epoch"] is not None:

        def evaluate(epoch):
            outputs, labels = common.predict(
                make_predict_forward(model, levels), loaders["epoch"], device=device, dtype=args.dtype
            )
            fine_logits, *level_logits = outputs
            res = level_results(fine_logits, level_logits if with_stacks else [], labels[0], levels)
            record = {"val_fine_acc": 100.0 - res["fine_error"]}
            record.update({f"val_acc_{k}": 100.0 - v for k, v in res.get("level_error", {}).items()})
            return record

    history = common.fit(
        run_dir / name,
        model,
        optimizer,
        step,
        train_loader,
        epochs=args.epochs,
        lr_at=lambda s: args.lr,
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage=name,
        on_epoch_end=on_epoch_end,
    )
    outputs, labels = common.predict(
        make_predict_forward(model, levels), loaders["final"], device=device, dtype=args.dtype
    )
    fine_logits, *level_logits = outputs
    result = level_results(fine_logits, level_logits if with_stacks else [], labels[0], levels)
    if tree is not None:  # tree = (hierarchy, {head: tree level}); the heads give the consistency rate
        hierarchy, head_map = tree
        by_name = dict(zip([l.name for l in levels], level_logits))
        level_preds = {head_map[n]: by_name[n].argmax(1) for n in head_map} if with_stacks and head_map else None
        scores = fine_logits.float().log_softmax(1)
        result["hierarchical"] = common.hierarchical_metrics(scores, labels[0], hierarchy, level_preds)
    result["train_seconds"] = round(sum(r["seconds"] for r in history), 2)
    result["final_train_loss"] = history[-1]["loss"] if history else None
    result["final_train_acc"] = {k: v for k, v in history[-1].items() if k.startswith("train_acc")} if history else {}
    return result


# ---------------------------------------------------------------------------------------
# The levels of the class hierarchy and the data
# ---------------------------------------------------------------------------------------


@dataclass
class Level:
    """One hierarchy level the model predicts: names of its classes and each fine class's class."""

    name: str
    class_names: list
    parent: np.ndarray  # int64, one entry per fine class

    @property
    def num_classes(self):
        return len(self.class_names)

    def labels(self, fine_labels):
        return torch.as_tensor(self.parent)[fine_labels]


CIFAR100_CLASSES = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard
lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear
pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark
shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone
television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split()


# The paper's WordNet categories of experiment 6 (LEVEL12_NAMES, LEVEL6_NAMES, LEVEL2_NAMES; head outputs
# follow their order) and the CIFAR-100 class -> (12-, 6-, 2-level category) table of each reading
# (WORDNET_TABLES) are at the end of this file, generated offline from WordNet 3.0 by
# tools/derive_cifar100_wordnet.py (no WordNet or nltk at run time): first-sense (default: each class name's
# most frequent noun sense; all 12 / 6 / 2 categories get classes, as in the paper) and fixed-synset (one
# fixed synset per class; 4 of the 12 empty). --levels picks one; docs/hdl_cifar100_levels.md lists the 18
# classes that move between them and why.
DEFAULT_LEVELS = "first-sense"


def check_wordnet_table(table=None, class_names=CIFAR100_CLASSES):
    """Check a class table (default: the default reading's); returns the three parent arrays (12-, 6-,
    2-level index per class).

    Every class appears exactly once, every category is one of its level's names, every 12-level
    category has one 6-level parent and every 6-level category one 2-level parent. Raises
    ValueError with the first problem."""
    table = WORDNET_TABLES[DEFAULT_LEVELS] if table is None else table
    names = [row[0] for row in table]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"classes listed more than once: {duplicates}")
    missing, unknown = sorted(set(class_names) - set(names)), sorted(set(names) - set(class_names))
    if missing or unknown:
        raise ValueError(f"table does not match the classes: missing {missing}, unknown {unknown}")
    level_names = (LEVEL12_NAMES, LEVEL6_NAMES, LEVEL2_NAMES)
    for row in table:
        if len(row) != 4:
            raise ValueError(f"row {row!r}: expected (class, level12, level6, level2)")
        for category, allowed in zip(row[1:], level_names):
            if category not in allowed:
                raise ValueError(f"row {row!r}: {category!r} is not one of {allowed}")
    for child, parent in ((1, 2), (2, 3)):
        parents = {}
        for row in table:
            parents.setdefault(row[child], set()).add(row[parent])
        bad = {c: sorted(p) for c, p in parents.items() if len(p) > 1}
        if bad:
            raise ValueError(f"inconsistent parent chain: {bad}")
    by_name = {row[0]: row for row in table}
    return [
        np.array([names_l.index(by_name[c][1 + l]) for c in class_names], dtype=np.int64)
        for l, names_l in enumerate(level_names)
    ]


def empty_categories(table):
    """Per level (12, 6, 2), the paper's categories that no class of the table falls under."""
    return [
        [name for name in names if name not in {row[1 + l] for row in table}]
        for l, names in enumerate((LEVEL12_NAMES, LEVEL6_NAMES, LEVEL2_NAMES))
    ]


def make_levels(data, args):
    """The levels the heads predict, finest first (Table 3's 1L, 2L, 3L order)."""
    fine_names = data.class_names
    if data.name == "shapes" and not args.hierarchy:
        # The paper's three questions, Table 4's order. common.make_shapes numbers fine classes as
        # shape * 36 + fill * 6 + outline; the per-image labels must agree with that.
        fine = np.arange(len(fine_names))
        levels = [
            Level("fill", list(common.FILL_COLOURS), (fine // 6) % 6),
            Level("outline", list(common.OUTLINE_COLOURS), fine % 6),
            Level("shape", list(common.SHAPE_NAMES), fine // 36),
        ]
        for split in (data.train, data.test):
            for level in levels:
                if not torch.equal(level.labels(split.labels), split.extra[level.name]):
                    common.fail(f"shapes: the '{level.name}' labels disagree with the fine-class numbering")
        return levels
    if data.name == "cifar100" and not args.hierarchy:
        try:
            parents = check_wordnet_table(WORDNET_TABLES[args.levels], class_names=fine_names)
        except ValueError as e:
            common.fail(f"CIFAR-100 WordNet table ({args.levels}): {e}")
        return [
            Level(name, names, parent)
            for name, names, parent in zip(
                ("category12", "category6", "category2"), (LEVEL12_NAMES, LEVEL6_NAMES, LEVEL2_NAMES), parents
            )
        ]
    h = data.hierarchy
    if h.n_levels < 2:
        common.fail(f"--dataset {data.name} has no class hierarchy; pass --hierarchy FILE.json")
    return [
        Level(h.level_names[l], h.class_names[l], np.asarray(h.parents[l])) for l in reversed(range(h.n_levels - 1))
    ]


def default_epochs(dataset):
    """Experiment 6's 800 epochs; shapes' count is not given ("high accuracy starting from the first ten epochs")."""
    return 20 if dataset == "shapes" else 800


def levels_reading(args):
    """The WordNet reading of CIFAR-100's levels (--levels), None where the levels come from elsewhere."""
    return args.levels if args.dataset == "cifar100" and not args.hierarchy else None


def stack_hidden_sizes(spec, args, levels):
    """Hidden width of each level's stack (None: a single linear layer); see --stack-hidden."""
    if spec == "auto":  # experiment 6's widths on CIFAR; a --hierarchy file gets single layers
        spec = "none" if args.hierarchy else {"cifar100": "100,10,4", "cifar10": "4"}.get(args.dataset, "none")
    if spec == "none":
        return [None] * len(levels)
    try:
        sizes = [int(s) for s in spec.split(",")]
    except ValueError:
        common.fail(f"--stack-hidden {spec!r}: expected 'auto', 'none' or comma-separated integers")
    if len(sizes) != len(levels) or min(sizes) < 1:
        common.fail(
            f"--stack-hidden {spec!r}: need {len(levels)} positive widths, one per level "
            f"({', '.join(l.name for l in levels)})"
        )
    return sizes


def level_weights(args, levels):
    weights = args.lambda_levels
    if len(weights) == 1:
        return weights * len(levels)
    if len(weights) != len(levels):
        common.fail(
            f"--lambda-levels: got {len(weights)} weights for {len(levels)} levels "
            f"({', '.join(l.name for l in levels)})"
        )
    return list(weights)


def level_label_tuple(split, levels):
    return (split.labels,) + tuple(level.labels(split.labels) for level in levels)


def make_loaders(args, data, train, evaluated, levels, device):
    """GpuLoaders of the training split (crop + flip on CIFAR, experiment 6) and of the split evaluated;
    pixels scaled to [0, 1] only, unless --normalize (section 4.1: no normalisation)."""
    augment = (
        args.augment if args.augment != "auto" else ("crop-flip" if args.dataset in ("cifar10", "cifar100") else "none")
    )
    mean, std = (data.mean, data.std) if args.normalize else ((0.0,) * 3, (1.0,) * 3)  # 1/255 scaling only
    max_batches = 2 if args.dry_run else None
    channels = train.images.shape[1]
    if channels != 3:
        common.fail(f"--dataset {args.dataset}: ResNet-18 here takes 3-channel images, got {channels}")
    train_loader = common.GpuLoader(
        train.images,
        level_label_tuple(train, levels),
        args.batch_size,
        device=device,
        mean=mean,
        std=std,
        train=True,
        crop_pad=4 if augment == "crop-flip" else 0,
        flip=augment == "crop-flip",
        seed=args.seed,
        max_batches=max_batches,
    )
    eval_loader = common.GpuLoader(
        evaluated.images,
        level_label_tuple(evaluated, levels),
        args.eval_batch_size,
        device=device,
        mean=mean,
        std=std,
        max_batches=max_batches,
    )
    return train_loader, eval_loader


def validation_split(labels, fraction, seed):
    """Hold out round(fraction * n_c) training images of every class c (seeded); returns (val, train) index arrays."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.append(rng.permutation(idx)[: round(fraction * len(idx))])
    val = np.sort(np.concatenate(val))
    if len(val) == 0:
        common.fail(f"--val-fraction {fraction}: the validation split would be empty")
    return val, np.setdiff1d(np.arange(len(labels)), val)


# ---------------------------------------------------------------------------------------
# The backbone: ResNet-18 and PreAct ResNet-18
# ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet-18's block with a 1x1 projection shortcut when the shape changes (option B)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = common.conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = common.conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (He et al., identity mappings)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), common.conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), common.conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride > 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class ResNet18(common.Backbone):
    """ResNet-18: 4 stages of 2 blocks, 64-128-256-512, adaptive average pooling.

    stem='imagenet' is the 7x7 stride-2 convolution, BN, ReLU and 3x3 stride-2 max-pool (the
    HDL paper's); stem='cifar' is one 3x3 stride-1 convolution. preact=True uses
    pre-activation blocks (PreAct ResNet-18)."""

    def __init__(self, num_classes=10, stem="imagenet", preact=False, in_channels=3):
        super().__init__()
        if stem == "imagenet":
            layers = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)]
            if not preact:
                layers += [nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*layers, nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            layers = [common.conv3x3(in_channels, 64)]
            self.stem = (
                nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            )
        else:
            common.fail(f"ResNet-18 stem must be 'imagenet' or 'cifar', got {stem!r}")
        block = PreActBlock if preact else BasicBlock
        stages, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(block(cin, width, 1 if i == 0 else 2), block(width, width)))
            cin = width
        self.stages = nn.ModuleList(stages)
        pre = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU()) if preact else None
        self.head = common.Head(512, num_classes, pre=pre)
        common.init_weights(self)


# ---------------------------------------------------------------------------------------
# Evaluation: predictions, per-level errors, hierarchy violations
# ---------------------------------------------------------------------------------------


def make_predict_forward(model, levels):
    """forward(x) -> (fine scores, *level logits); fine scores from the levels when there is no fine classifier."""

    def forward(x):
        _, fine_logits, level_logits = model(x)
        if fine_logits is None:
            fine_logits = fine_scores_from_levels(level_logits, levels)
        return (fine_logits, *level_logits)

    return forward


def summed_level_scores(fine_logits, parent, num_classes):
    """A level's scores from a fine classifier: the fine probabilities summed per category."""
    probs = fine_logits.float().softmax(1)
    return torch.zeros(len(probs), num_classes).index_add_(1, torch.as_tensor(parent), probs)


def fine_scores_from_levels(level_logits, levels):
    """Fine-class scores of a model without a fine classifier: log p(fine) = sum over levels of the
    level head's log-probability of the fine class's category (the heads taken as independent).
    On shapes, where fill, outline and shape name the fine class, its argmax is the heads' argmaxes."""
    scores = 0
    for logits, level in zip(level_logits, levels):
        parent = torch.as_tensor(level.parent, device=logits.device)
        scores = scores + logits.float().log_softmax(1)[:, parent]
    return scores


def levels_identify_fine_classes(levels):
    """True when no two fine classes share all their level categories (needed without a fine classifier)."""
    codes = {tuple(int(level.parent[f]) for level in levels) for f in range(len(levels[0].parent))}
    return len(codes) == len(levels[0].parent)


def levels_nest(levels):
    """True when every level's category has one parent category in the next (coarser) level."""
    for finer, coarser in zip(levels, levels[1:]):
        for c in np.unique(finer.parent):
            if len(np.unique(coarser.parent[finer.parent == c])) > 1:
                return False
    return True


def metrics_hierarchy(levels, hierarchy):
    """(tree for common.hierarchical_metrics, {level head: the tree level it predicts}).

    Levels that nest (CIFAR-100's WordNet 12 / 6 / 2) form the tree themselves, every head
    checked. Otherwise (shapes: fill and outline are not nested) the dataset's own tree is used
    and only the heads with one of its levels (shapes: the shape head) are checked."""
    if levels and levels_nest(levels):
        ordered = list(reversed(levels))  # coarsest first
        num_fine = len(levels[0].parent)
        tree = common.Hierarchy(
            [l.name for l in ordered] + ["fine"],
            [l.class_names for l in ordered] + [list(range(num_fine))],
            [np.asarray(l.parent) for l in ordered] + [np.arange(num_fine)],
        )
        return tree, {l.name: l.name for l in levels}
    checked = {}
    for level in levels:
        for name, parent in zip(hierarchy.level_names[:-1], hierarchy.parents[:-1]):
            if np.array_equal(np.asarray(parent), level.parent):
                checked[level.name] = name
    return hierarchy, checked


def majority_errors(train_labels, eval_labels, names):
    """Error (%) of always guessing a level's largest category, the category taken from the training
    labels and scored on the evaluation labels; one entry per name (fine first, then the levels)."""
    result = {}
    for name, train, evaluated in zip(names, train_labels, eval_labels):
        largest = torch.bincount(torch.as_tensor(train)).argmax()
        result[name] = 100.0 * (torch.as_tensor(evaluated) != largest).float().mean().item()
    return result


def violation_rates(fine_pred, level_preds, levels):
    """How often one image's predictions contradict the hierarchy (fractions in [0, 1]).

    with_fine: some level head disagrees with the category of the predicted fine class.
    levels_only: no fine class has exactly the predicted combination of level categories (e.g.
    'person' at 12 categories with 'object' at 6)."""
    fine_pred = torch.as_tensor(fine_pred)
    if not levels:
        return {"with_fine": 0.0, "levels_only": 0.0}
    disagree = torch.zeros(len(fine_pred), dtype=torch.bool)
    for pred, level in zip(level_preds, levels):
        disagree |= torch.as_tensor(pred) != level.labels(fine_pred)
    # Encode each combination of level classes as one integer (mixed radix); the fine classes'
    # combinations are the valid ones.
    code_pred, code_valid, radix = 0, 0, 1
    for pred, level in zip(level_preds, levels):
        code_pred = code_pred + radix * torch.as_tensor(pred).long()
        code_valid = code_valid + radix * torch.as_tensor(level.parent)
        radix *= level.num_classes
    invalid = ~torch.isin(torch.as_tensor(code_pred), torch.as_tensor(code_valid))
    return {"with_fine": disagree.float().mean().item(), "levels_only": invalid.float().mean().item()}


def level_results(fine_logits, level_logits, fine_labels, levels):
    """Every reported error (%): fine, each head, each level from summed fine probabilities; violations."""
    result = {
        "fine_error": 100.0 - common.accuracy(fine_logits, fine_labels),
        "level_error": {},
        "summed_fine_level_error": {},
    }
    for level, logits in zip(levels, level_logits):
        result["level_error"][level.name] = 100.0 - common.accuracy(logits, level.labels(fine_labels))
    for level in levels:
        scores = summed_level_scores(fine_logits, level.parent, level.num_classes)
        result["summed_fine_level_error"][level.name] = 100.0 - common.accuracy(scores, level.labels(fine_labels))
    if level_logits:
        rates = violation_rates(fine_logits.argmax(1), [l.argmax(1) for l in level_logits], levels)
        result["violation_rate"] = {k: 100.0 * v for k, v in rates.items()}
    else:
        result.pop("level_error")
    return result


def main(argv=None):
    args = get_args(argv)
    if args.epochs is None:
        args.epochs = default_epochs(args.dataset)
    run_dir, device = common.setup(args, "hdl_stack")
    data = common.load_data(args)

    # 1. The levels the heads predict, finest first (shapes: fill, outline, shape; CIFAR-100: WordNet 12 / 6 / 2).
    levels = make_levels(data, args)
    if args.fine_head == "off" and not levels_identify_fine_classes(levels):
        common.fail("--fine-head off: the levels do not tell every fine class apart; use --fine-head on")
    hidden_sizes = stack_hidden_sizes(args.stack_hidden, args, levels)
    lambda_levels = level_weights(args, levels)
    write_levels_json(run_dir / "levels.json", args, data, levels, hidden_sizes)

    # 2. Data: the training split (minus a validation split with --val-fraction), the split evaluated.
    train, evaluated, eval_split = data.train, data.test, "test"
    if args.val_fraction:
        val_idx, train_idx = validation_split(train.labels.numpy(), args.val_fraction, args.seed)
        evaluated, train, eval_split = train.subset(val_idx), train.subset(train_idx), "val"
    train_loader, eval_loader = make_loaders(args, data, train, evaluated, levels, device)
    loaders = {"epoch": eval_loader if eval_split == "val" else None, "final": eval_loader}
    names = ["fine"] + [l.name for l in levels]
    majority = majority_errors(level_label_tuple(train, levels), level_label_tuple(evaluated, levels), names)
    print_setup(args, data, train, evaluated, eval_split, levels, hidden_sizes, device)
    tree = metrics_hierarchy(levels, data.hierarchy)
    stage = (train_loader, loaders, levels, run_dir, device)  # run_stage's arguments shared by both models

    # 3. The baseline ResNet-18: its fine classifier alone, cross-entropy.
    results = {}
    if args.method in ("both", "baseline"):
        model = build_model(args, data.num_classes, levels, hidden_sizes, device, with_stacks=False)
        results["baseline"] = run_stage("baseline", args, model, baseline_loss_fn, *stage, with_stacks=False, tree=tree)
        train_loader.generator.manual_seed(args.seed)  # HDL sees the baseline's batch order

    # 4. HDL from the same initialisation: the level stacks' cross-entropies and the center loss (eq. 5);
    #    the centres move after each epoch (end_of_epoch_centers) or, with --center-update wen / sgd, every batch.
    if args.method in ("both", "hdl"):
        model = build_model(args, data.num_classes, levels, hidden_sizes, device, with_stacks=True)
        loss_fn = make_hdl_loss_fn(
            args.lambda_center,
            args.lambda_fine,
            lambda_levels,
            center_update=args.center_update,
            center_alpha=args.center_alpha,
            center_features=args.center_features,
        )
        results["hdl"] = run_stage("hdl", args, model, loss_fn, *stage, with_stacks=True, tree=tree)
        results["hdl"]["parameters"] = common.count_params(model)
        results["hdl"]["stack_parameters"] = common.count_params(model.stacks)

    # 5. Reports: metrics.json and the errors printed (Tables 3 and 4: python tools/results_table.py --run DIR).
    report(
        run_dir, args, data, levels, hidden_sizes, lambda_levels, train, evaluated, eval_split, majority, tree, results
    )
    return results


# ---------------------------------------------------------------------------------------
# Reports: levels.json, metrics.json, the summary printed (the tables: tools/results_table.py --run DIR)
# ---------------------------------------------------------------------------------------


def write_levels_json(path, args, data, levels, hidden_sizes):
    """levels.json: the class-to-level maps used, the stacks' hidden widths and CIFAR-100's WordNet reading."""
    common.write_json(
        path,
        {
            "fine": data.class_names,
            "reading": levels_reading(args),
            "stack_hidden": hidden_sizes,
            "levels": [
                {
                    "name": l.name,
                    "class_names": l.class_names,
                    "parent": l.parent.tolist(),
                    "fine_classes_per_category": np.bincount(l.parent, minlength=l.num_classes).tolist(),
                }
                for l in levels
            ],
        },
    )


def print_setup(args, data, train, evaluated, eval_split, levels, hidden_sizes, device):
    num_fine = data.num_classes
    print(
        f"[hdl_stack] {args.dataset}: {len(train)} train / {len(evaluated)} {eval_split}, {num_fine} fine classes; "
        + ", ".join(f"{i + 1}L {l.name} ({l.num_classes})" for i, l in enumerate(levels))
        + f"; stack hidden {hidden_sizes}, {args.heads} heads, fine classifier {args.fine_head}; "
        f"{args.arch} ({args.stem} stem) on {device}",
        flush=True,
    )


def report(
    run_dir, args, data, levels, hidden_sizes, lambda_levels, train, evaluated, eval_split, majority, tree, results
):
    """The end of a run: metrics.json (every reported number and the HDL configuration) and a few lines of
    errors printed; Tables 3 and 4 beside the paper's, with the majority-category rows:
    python tools/results_table.py --run RUN_DIR."""
    paper = {"level_accuracy": PAPER_SHAPES_ACCURACY} if args.dataset == "shapes" and not args.hierarchy else None
    common.write_json(
        run_dir / "metrics.json",
        {
            "dataset": args.dataset,
            "arch": args.arch,
            "stem": args.stem,
            "epochs": args.epochs,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "train_size": len(train),
            "eval_split": eval_split,
            "eval_size": len(evaluated),
            "test_size": len(data.test),
            "levels": [
                {
                    "level": f"{i + 1}L",
                    "name": l.name,
                    "num_classes": l.num_classes,
                    "empty_categories": [
                        c for c, n in zip(l.class_names, np.bincount(l.parent, minlength=l.num_classes)) if not n
                    ],
                }
                for i, l in enumerate(levels)
            ],
            "levels_reading": levels_reading(args),
            "stack_hidden": hidden_sizes,
            "lambdas": {"center": args.lambda_center, "fine": args.lambda_fine, "levels": lambda_levels},
            "hdl_config": {
                "heads": args.heads,
                "fine_head": args.fine_head,
                "center_update": args.center_update,
                "center_alpha": args.center_alpha,
                "center_features": args.center_features,
                "lambda_center": args.lambda_center,
            },
            "majority_error": majority,
            "hierarchical_tree": {"levels": tree[0].level_names, "heads_checked": tree[1]},
            **results,
            "paper": paper,
        },
    )
    for name, res in results.items():
        levels_text = ", ".join(
            f"{l.name} {res['level_error'][l.name]:.2f}" for l in levels if l.name in res.get("level_error", {})
        )
        print(
            f"[hdl_stack] {name}, {eval_split} error %: fine {res['fine_error']:.2f}"
            + (f" | level heads {levels_text}" if levels_text else "")
            + (f" | violations {res['violation_rate']['with_fine']:.2f}" if "violation_rate" in res else ""),
            flush=True,
        )
    print(f"[hdl_stack] results in {run_dir} (Tables 3 and 4: python tools/results_table.py --run DIR)", flush=True)


# --- CIFAR-100 WordNet levels: generated by tools/derive_cifar100_wordnet.py, do not edit ---
# CIFAR-100 classes -> the paper's WordNet categories (experiment 6: 12 / 6 / 2; head outputs follow the
# names' order), two readings, derived offline (no WordNet or nltk at run time) from
# WordNet 3.0 (Debian's wordnet-base: data.noun, index.noun).
# first-sense (the default, --levels first-sense): each class name's most frequent noun sense (its first
# word's first index.noun sense, nltk's synsets(word)[0]); fills every category, as the paper.
# fixed-synset (--levels fixed-synset): one fixed synset per class (the NBDT list, four senses fixed);
# leaves arrangement, substance, part and location empty. docs/hdl_cifar100_levels.md lists every class
# that moves between them, with the sense each reading takes.
LEVEL12_NAMES = [
    "whole",
    "person",
    "phenomenon",
    "body of water",
    "arrangement",
    "substance",
    "solid",
    "geological formation",
    "part",
    "collection",
    "location",
    "land",
]
LEVEL6_NAMES = ["object", "causal agent", "process", "thing", "group", "matter"]
LEVEL2_NAMES = ["physical entity", "abstraction"]

# first-sense: decisions where a synset's hypernym paths disagree, or its sense is fixed:
# - apple, orange, pear: override -> ('solid', 'matter') (not [('whole', 'object')]): synset is the edible fruit
#   (lexicographer file noun.food); take its food path edible_fruit>produce>food>solid (also the shorter one) over
#   the botanical fruit>natural_object>whole
# - baby, boy, girl, man, shrew, skunk, sweet_pepper, tiger, whale, woman: override -> ('person', 'causal agent')
#   (not [('person', 'object')]): person's hypernyms are causal_agent and organism; only
#   entity>physical_entity>causal_agent>person puts person at the paper's depth (the organism path would put person
#   under object)
# - beaver, leopard, maple_tree, oak_tree, otter, raccoon: override -> ('substance', 'matter') (not [('substance',
#   None)]): synset is a fur or a wood (material>substance); substance's second hypernym, part>relation>abstraction,
#   reaches no 6-level category, so the one complete chain substance>matter is taken
# 12-level classes: whole 69, person 10, phenomenon 2, body of water 1, arrangement 1, substance 6, solid 6,
#   geological formation 1, part 1, collection 1, location 1, land 1
# 6-level classes: object 72, causal agent 10, process 2, thing 2, group 2, matter 12
# 2-level classes: physical entity 98, abstraction 2
WORDNET_FIRST_SENSE = [  # (class, level12, level6, level2)  # synset (word looked up)
    ("apple", "solid", "matter", "physical entity"),  # n07739125 apple
    ("aquarium_fish", "whole", "object", "physical entity"),  # n02732072 aquarium (word "aquarium")
    ("baby", "person", "causal agent", "physical entity"),  # n09827683 baby
    ("bear", "whole", "object", "physical entity"),  # n02131653 bear
    ("beaver", "substance", "matter", "physical entity"),  # n14764617 beaver
    ("bed", "whole", "object", "physical entity"),  # n02818832 bed
    ("bee", "whole", "object", "physical entity"),  # n02206856 bee
    ("beetle", "whole", "object", "physical entity"),  # n02164464 beetle
    ("bicycle", "whole", "object", "physical entity"),  # n02834778 bicycle
    ("bottle", "whole", "object", "physical entity"),  # n02876657 bottle
    ("bowl", "whole", "object", "physical entity"),  # n02881193 bowl
    ("boy", "person", "causal agent", "physical entity"),  # n10285313 male_child
    ("bridge", "whole", "object", "physical entity"),  # n02898711 bridge
    ("bus", "whole", "object", "physical entity"),  # n02924116 bus
    ("butterfly", "whole", "object", "physical entity"),  # n02274259 butterfly
    ("camel", "whole", "object", "physical entity"),  # n02437136 camel
    ("can", "whole", "object", "physical entity"),  # n02946921 can
    ("castle", "whole", "object", "physical entity"),  # n03878066 palace
    ("caterpillar", "whole", "object", "physical entity"),  # n02309337 caterpillar
    ("cattle", "whole", "object", "physical entity"),  # n02402425 cattle
    ("chair", "whole", "object", "physical entity"),  # n03001627 chair
    ("chimpanzee", "whole", "object", "physical entity"),  # n02481823 chimpanzee
    ("clock", "whole", "object", "physical entity"),  # n03046257 clock
    ("cloud", "phenomenon", "process", "physical entity"),  # n11439690 cloud
    ("cockroach", "whole", "object", "physical entity"),  # n02233338 cockroach
    ("couch", "whole", "object", "physical entity"),  # n04256520 sofa
    ("crab", "whole", "object", "physical entity"),  # n01976957 crab
    ("crocodile", "whole", "object", "physical entity"),  # n01697178 crocodile
    ("cup", "whole", "object", "physical entity"),  # n03147509 cup
    ("dinosaur", "whole", "object", "physical entity"),  # n01699831 dinosaur
    ("dolphin", "whole", "object", "physical entity"),  # n02581957 dolphinfish
    ("elephant", "whole", "object", "physical entity"),  # n02503517 elephant
    ("flatfish", "solid", "matter", "physical entity"),  # n07790400 flatfish
    ("forest", "collection", "group", "abstraction"),  # n08438533 forest
    ("fox", "whole", "object", "physical entity"),  # n02118333 fox
    ("girl", "person", "causal agent", "physical entity"),  # n10129825 girl
    ("hamster", "whole", "object", "physical entity"),  # n02342885 hamster
    ("house", "whole", "object", "physical entity"),  # n03544360 house
    ("kangaroo", "whole", "object", "physical entity"),  # n01877134 kangaroo
    ("keyboard", "whole", "object", "physical entity"),  # n03614007 keyboard
    ("lamp", "whole", "object", "physical entity"),  # n03636248 lamp
    ("lawn_mower", "location", "object", "physical entity"),  # n08591592 lawn (word "lawn")
    ("leopard", "substance", "matter", "physical entity"),  # n14765422 leopard
    ("lion", "whole", "object", "physical entity"),  # n02129165 lion
    ("lizard", "whole", "object", "physical entity"),  # n01674464 lizard
    ("lobster", "solid", "matter", "physical entity"),  # n07792725 lobster
    ("man", "person", "causal agent", "physical entity"),  # n10287213 man
    ("maple_tree", "substance", "matter", "physical entity"),  # n12752666 maple (word "maple")
    ("motorcycle", "whole", "object", "physical entity"),  # n03790512 motorcycle
    ("mountain", "geological formation", "object", "physical entity"),  # n09359803 mountain
    ("mouse", "whole", "object", "physical entity"),  # n02330245 mouse
    ("mushroom", "whole", "object", "physical entity"),  # n13001041 mushroom
    ("oak_tree", "substance", "matter", "physical entity"),  # n12268918 oak (word "oak")
    ("orange", "solid", "matter", "physical entity"),  # n07747607 orange
    ("orchid", "whole", "object", "physical entity"),  # n12041446 orchid
    ("otter", "substance", "matter", "physical entity"),  # n14765785 otter
    ("palm_tree", "part", "thing", "physical entity"),  # n05565696 palm (word "palm")
    ("pear", "solid", "matter", "physical entity"),  # n07767847 pear
    ("pickup_truck", "whole", "object", "physical entity"),  # n03930630 pickup (word "pickup")
    ("pine_tree", "whole", "object", "physical entity"),  # n11608250 pine (word "pine")
    ("plain", "land", "object", "physical entity"),  # n09393605 plain
    ("plate", "whole", "object", "physical entity"),  # n03528901 home_plate
    ("poppy", "whole", "object", "physical entity"),  # n11900569 poppy
    ("porcupine", "whole", "object", "physical entity"),  # n02346627 porcupine
    ("possum", "whole", "object", "physical entity"),  # n01874928 opossum
    ("rabbit", "whole", "object", "physical entity"),  # n02324045 rabbit
    ("raccoon", "substance", "matter", "physical entity"),  # n14765856 raccoon
    ("ray", "phenomenon", "process", "physical entity"),  # n11428023 beam
    ("road", "whole", "object", "physical entity"),  # n04096066 road
    ("rocket", "whole", "object", "physical entity"),  # n04099429 rocket
    ("rose", "whole", "object", "physical entity"),  # n12620196 rose
    ("sea", "body of water", "thing", "physical entity"),  # n09426788 sea
    ("seal", "whole", "object", "physical entity"),  # n04160036 sealing_wax
    ("shark", "whole", "object", "physical entity"),  # n01482330 shark
    ("shrew", "person", "causal agent", "physical entity"),  # n10594147 shrew
    ("skunk", "person", "causal agent", "physical entity"),  # n10539715 rotter
    ("skyscraper", "whole", "object", "physical entity"),  # n04233124 skyscraper
    ("snail", "whole", "object", "physical entity"),  # n01944390 snail
    ("snake", "whole", "object", "physical entity"),  # n01726692 snake
    ("spider", "whole", "object", "physical entity"),  # n01772222 spider
    ("squirrel", "whole", "object", "physical entity"),  # n02355227 squirrel
    ("streetcar", "whole", "object", "physical entity"),  # n04335435 streetcar
    ("sunflower", "whole", "object", "physical entity"),  # n11978233 sunflower
    ("sweet_pepper", "person", "causal agent", "physical entity"),  # n11326730 sweet (word "sweet")
    ("table", "arrangement", "group", "abstraction"),  # n08266235 table
    ("tank", "whole", "object", "physical entity"),  # n04389033 tank
    ("telephone", "whole", "object", "physical entity"),  # n04401088 telephone
    ("television", "whole", "object", "physical entity"),  # n06277280 television
    ("tiger", "person", "causal agent", "physical entity"),  # n10710632 tiger
    ("tractor", "whole", "object", "physical entity"),  # n04465501 tractor
    ("train", "whole", "object", "physical entity"),  # n04468005 train
    ("trout", "solid", "matter", "physical entity"),  # n07794452 trout
    ("tulip", "whole", "object", "physical entity"),  # n12454159 tulip
    ("turtle", "whole", "object", "physical entity"),  # n04502197 turtleneck
    ("wardrobe", "whole", "object", "physical entity"),  # n04550184 wardrobe
    ("whale", "person", "causal agent", "physical entity"),  # n10129133 giant
    ("willow_tree", "whole", "object", "physical entity"),  # n12724942 willow (word "willow")
    ("wolf", "whole", "object", "physical entity"),  # n02114100 wolf
    ("woman", "person", "causal agent", "physical entity"),  # n10787470 woman
    ("worm", "whole", "object", "physical entity"),  # n01922303 worm
]

# fixed-synset: decisions where a synset's hypernym paths disagree, or its sense is fixed:
# - apple, orange, pear: override -> ('solid', 'matter') (not [('whole', 'object')]): synset is the edible fruit
#   (lexicographer file noun.food); take its food path edible_fruit>produce>food>solid (also the shorter one) over
#   the botanical fruit>natural_object>whole
# - baby, boy, girl, man, woman: override -> ('person', 'causal agent') (not [('person', 'object')]): person's
#   hypernyms are causal_agent and organism; only entity>physical_entity>causal_agent>person puts person at the
#   paper's depth (the organism path would put person under object)
# - dolphin: sense fix: note's 02581957 is the dolphinfish (mahimahi); CIFAR-100's dolphin is the toothed whale
#   (superclass 'aquatic mammals'): use 02068974 (same whole>object chain, so no label changes)
# - skunk: sense fix: note's 07476495 is 'shutout, skunk' (a defeat, under abstraction>event); use the animal
#   02445715 'skunk, polecat, wood_pussy'
# - sweet_pepper: sense fix: note's 12901264 is the pepper shrub (whole>object); CIFAR-100's images are the
#   vegetable, like apple/orange/pear of the same superclass 'fruit and vegetables', which use the food sense: use
#   07720615 sweet_pepper the vegetable (food>solid>matter)
# - trout: sense fix: note's 07794452 is trout the food ('flesh of ... fishes', under food>solid>matter);
#   CIFAR-100's trout are live fish (superclass 'fish'): use the fish 02537085 (whole>object)
# 12-level classes: whole 86, person 5, phenomenon 1, body of water 1, arrangement 0, substance 0, solid 4,
#   geological formation 1, part 0, collection 1, location 0, land 1 (empty: arrangement, substance, part, location)
# 6-level classes: object 88, causal agent 5, process 1, thing 1, group 1, matter 4
# 2-level classes: physical entity 99, abstraction 1
WORDNET_FIXED_SYNSET = [  # (class, level12, level6, level2)  # synset
    ("apple", "solid", "matter", "physical entity"),  # n07739125 apple
    ("aquarium_fish", "whole", "object", "physical entity"),  # n02512752 fingerling
    ("baby", "person", "causal agent", "physical entity"),  # n09827683 baby
    ("bear", "whole", "object", "physical entity"),  # n02131653 bear
    ("beaver", "whole", "object", "physical entity"),  # n02363005 beaver
    ("bed", "whole", "object", "physical entity"),  # n02818832 bed
    ("bee", "whole", "object", "physical entity"),  # n02206856 bee
    ("beetle", "whole", "object", "physical entity"),  # n02164464 beetle
    ("bicycle", "whole", "object", "physical entity"),  # n02834778 bicycle
    ("bottle", "whole", "object", "physical entity"),  # n02876657 bottle
    ("bowl", "whole", "object", "physical entity"),  # n02881193 bowl
    ("boy", "person", "causal agent", "physical entity"),  # n10285313 male_child
    ("bridge", "whole", "object", "physical entity"),  # n02898711 bridge
    ("bus", "whole", "object", "physical entity"),  # n02924116 bus
    ("butterfly", "whole", "object", "physical entity"),  # n02274259 butterfly
    ("camel", "whole", "object", "physical entity"),  # n02437136 camel
    ("can", "whole", "object", "physical entity"),  # n02946921 can
    ("castle", "whole", "object", "physical entity"),  # n02980441 castle
    ("caterpillar", "whole", "object", "physical entity"),  # n02309337 caterpillar
    ("cattle", "whole", "object", "physical entity"),  # n02402425 cattle
    ("chair", "whole", "object", "physical entity"),  # n03001627 chair
    ("chimpanzee", "whole", "object", "physical entity"),  # n02481823 chimpanzee
    ("clock", "whole", "object", "physical entity"),  # n03046257 clock
    ("cloud", "phenomenon", "process", "physical entity"),  # n11439690 cloud
    ("cockroach", "whole", "object", "physical entity"),  # n02233338 cockroach
    ("couch", "whole", "object", "physical entity"),  # n04256520 sofa
    ("crab", "whole", "object", "physical entity"),  # n01976957 crab
    ("crocodile", "whole", "object", "physical entity"),  # n01697178 crocodile
    ("cup", "whole", "object", "physical entity"),  # n03147509 cup
    ("dinosaur", "whole", "object", "physical entity"),  # n01699831 dinosaur
    ("dolphin", "whole", "object", "physical entity"),  # n02068974 dolphin
    ("elephant", "whole", "object", "physical entity"),  # n02503517 elephant
    ("flatfish", "whole", "object", "physical entity"),  # n02657368 flatfish
    ("forest", "collection", "group", "abstraction"),  # n08438533 forest
    ("fox", "whole", "object", "physical entity"),  # n02118333 fox
    ("girl", "person", "causal agent", "physical entity"),  # n10129825 girl
    ("hamster", "whole", "object", "physical entity"),  # n02342885 hamster
    ("house", "whole", "object", "physical entity"),  # n03544360 house
    ("kangaroo", "whole", "object", "physical entity"),  # n01877134 kangaroo
    ("keyboard", "whole", "object", "physical entity"),  # n03614007 keyboard
    ("lamp", "whole", "object", "physical entity"),  # n03636248 lamp
    ("lawn_mower", "whole", "object", "physical entity"),  # n03649909 lawn_mower
    ("leopard", "whole", "object", "physical entity"),  # n02128385 leopard
    ("lion", "whole", "object", "physical entity"),  # n02129165 lion
    ("lizard", "whole", "object", "physical entity"),  # n01674464 lizard
    ("lobster", "whole", "object", "physical entity"),  # n01982650 lobster
    ("man", "person", "causal agent", "physical entity"),  # n10287213 man
    ("maple_tree", "whole", "object", "physical entity"),  # n12752205 maple
    ("motorcycle", "whole", "object", "physical entity"),  # n03790512 motorcycle
    ("mountain", "geological formation", "object", "physical entity"),  # n09359803 mountain
    ("mouse", "whole", "object", "physical entity"),  # n02330245 mouse
    ("mushroom", "whole", "object", "physical entity"),  # n13001041 mushroom
    ("oak_tree", "whole", "object", "physical entity"),  # n12268246 oak
    ("orange", "solid", "matter", "physical entity"),  # n07747607 orange
    ("orchid", "whole", "object", "physical entity"),  # n12041446 orchid
    ("otter", "whole", "object", "physical entity"),  # n02444819 otter
    ("palm_tree", "whole", "object", "physical entity"),  # n12582231 palm
    ("pear", "solid", "matter", "physical entity"),  # n07767847 pear
    ("pickup_truck", "whole", "object", "physical entity"),  # n03930630 pickup
    ("pine_tree", "whole", "object", "physical entity"),  # n11608250 pine
    ("plain", "land", "object", "physical entity"),  # n09393605 plain
    ("plate", "whole", "object", "physical entity"),  # n03959485 plate
    ("poppy", "whole", "object", "physical entity"),  # n11900569 poppy
    ("porcupine", "whole", "object", "physical entity"),  # n02346627 porcupine
    ("possum", "whole", "object", "physical entity"),  # n01874928 opossum
    ("rabbit", "whole", "object", "physical entity"),  # n02324045 rabbit
    ("raccoon", "whole", "object", "physical entity"),  # n02508021 raccoon
    ("ray", "whole", "object", "physical entity"),  # n01495701 ray
    ("road", "whole", "object", "physical entity"),  # n04096066 road
    ("rocket", "whole", "object", "physical entity"),  # n04099429 rocket
    ("rose", "whole", "object", "physical entity"),  # n12620196 rose
    ("sea", "body of water", "thing", "physical entity"),  # n09426788 sea
    ("seal", "whole", "object", "physical entity"),  # n02076196 seal
    ("shark", "whole", "object", "physical entity"),  # n01482330 shark
    ("shrew", "whole", "object", "physical entity"),  # n01891633 shrew
    ("skunk", "whole", "object", "physical entity"),  # n02445715 skunk
    ("skyscraper", "whole", "object", "physical entity"),  # n04233124 skyscraper
    ("snail", "whole", "object", "physical entity"),  # n01944390 snail
    ("snake", "whole", "object", "physical entity"),  # n01726692 snake
    ("spider", "whole", "object", "physical entity"),  # n01772222 spider
    ("squirrel", "whole", "object", "physical entity"),  # n02355227 squirrel
    ("streetcar", "whole", "object", "physical entity"),  # n04335435 streetcar
    ("sunflower", "whole", "object", "physical entity"),  # n11978233 sunflower
    ("sweet_pepper", "solid", "matter", "physical entity"),  # n07720615 sweet_pepper
    ("table", "whole", "object", "physical entity"),  # n04379243 table
    ("tank", "whole", "object", "physical entity"),  # n04389033 tank
    ("telephone", "whole", "object", "physical entity"),  # n04401088 telephone
    ("television", "whole", "object", "physical entity"),  # n06277280 television
    ("tiger", "whole", "object", "physical entity"),  # n02129604 tiger
    ("tractor", "whole", "object", "physical entity"),  # n04465501 tractor
    ("train", "whole", "object", "physical entity"),  # n04468005 train
    ("trout", "whole", "object", "physical entity"),  # n02537085 trout
    ("tulip", "whole", "object", "physical entity"),  # n12454159 tulip
    ("turtle", "whole", "object", "physical entity"),  # n01662784 turtle
    ("wardrobe", "whole", "object", "physical entity"),  # n04550184 wardrobe
    ("whale", "whole", "object", "physical entity"),  # n02062744 whale
    ("willow_tree", "whole", "object", "physical entity"),  # n12724942 willow
    ("wolf", "whole", "object", "physical entity"),  # n02114100 wolf
    ("woman", "person", "causal agent", "physical entity"),  # n10787470 woman
    ("worm", "whole", "object", "physical entity"),  # n01922303 worm
]

# reading -> [(fine_name, level12, level6, level2)]
WORDNET_TABLES = {"first-sense": WORDNET_FIRST_SENSE, "fixed-synset": WORDNET_FIXED_SYNSET}
# --- end of generated tables ---


if __name__ == "__main__":
    main()
