"""HierNet: Image Recognition with Hierarchical Convolutional Networks (Tempfli & Sandor).

A trained CIFAR ResNet is cut into a tree: a shared trunk (stem + the first `--split` residual
blocks), a super-class node that classifies the trunk's features into groups of confusable
classes after `--extra-blocks` blocks of its own (section 3.3), and one branch per group with
the remaining blocks and a leaf classifier over the group's classes. Groups come from the
confusion probability matrix of the backbone on a validation split (section 4, grouping.py).
Every part starts as a copy of the trained backbone, so every root-to-leaf path is the
backbone; the tree is then trained end to end with cross-entropy on the leaf probabilities
multiplied by their ancestors' probabilities (section 3.2). Reported: the backbone's accuracy,
the slow (all branches, product probabilities) and fast (routing, Algorithm 1) accuracies, the
super-class node's accuracy, and images/s of the three forms of inference.

Pipeline (one command; a stage is skipped when its output is given):
  1. backbone: train `CifarResNet(--n, --elu)` (or load `--backbone-ckpt`)
  2. CPM of the backbone on the validation half of the test set (or `--cpm file.npy`)
  3. grouping into a tree, depth `--depth` (or `--groups tree.json` from grouping.py, or
     `--tree-from dataset` for the dataset's own hierarchy)
  4. HierNet built from the backbone's weights
  5. end-to-end training with the same schedule
  6. evaluation on the test half, once: accuracies, per-group accuracies, images/s
Outputs in the run directory: tree.json / tree.txt / tree.dot (with class names), cpm.npy,
per_group.json and per_group.txt, metrics.jsonl (per epoch), metrics.json (every number).

Paper's run (Table 1, n = 9: 68.38 / 72.15 / 72.01 on CIFAR-100):
    python hiernet.py --dataset cifar100 --n 9 --split 16
Quick offline run:
    python hiernet.py --dataset shapes --image-size 32 --n 3 --iterations 4000

Schedule: the paper counts iterations at batch 128 (lr 0.01 for 2k, 0.1 to 32k, 0.01 to 48k,
0.001 to 64k). `--iterations` (default 64000) is the run length; with fewer (or more), every
boundary scales proportionally, e.g. `--iterations 4000` warms up for 125 iterations and
drops at 2000 and 3000. Epochs are the iterations over the loader length, rounded up
(64k / 390 = 165 epochs on 50k images). `--epochs E` instead fixes the length in epochs, and
the boundaries scale to E x loader length. `--lr` is the peak; the others are lr/10, lr/100.

Paper vs ours:
- Schedule and weight decay: the default follows the paper's text (coupled weight decay 1e-4,
  boundaries 2k/32k/48k of 64k). `--schedule code` follows the authors' code instead:
  boundaries 2k/34k/50k of 78k iterations (their 200 epochs) and decoupled weight decay that
  follows the learning rate (1e-5, 1e-4, 1e-5, 1e-6, i.e. 1e-3 x lr per step), SGD momentum
  0.9 without Nesterov in both. The same schedule trains the backbone and the HierNet (the
  paper: "the same configuration as the baseline model"); `--backbone-iterations` shortens
  the backbone's alone.
- Split: CIFAR's test set is halved per class with `common.split_half` (seeded): 5k validation
  for the CPM, the grouping and per-epoch monitoring, 5k test evaluated once at the end. The
  same for shapes' test set. Nothing is selected on the test half (no early stopping: the last
  epoch is evaluated).
- Labels are not rewritten in the dataset: the model keeps the permutation `order` (tree
  position -> class) and trains on `rank[label]`, which is the paper's reordering; its
  outputs are mapped back to the dataset's class indices for every reported number.
- Weight transfer: trunk, the super-class node's extra blocks (blocks split..split+extra-1)
  and every branch's blocks are deep copies of the trained backbone's modules (BatchNorm
  statistics included); a leaf FC takes the backbone FC's rows of its classes. The super-class
  FC (and every inner node's FC) is new, PyTorch's default init: its input is the features
  after split+extra blocks, which the backbone FC was never trained on. The paper's optional
  pre-training of the super-class node alone (in the authors' code) is not done.
- Loss: log p(leaf) = log_softmax(node logits)[child] summed along the path + log_softmax(leaf
  logits), then NLL; equal to the paper's cross-entropy on the product of softmaxes, stable.
- Slow forward runs every branch on the whole batch (training and slow evaluation: every
  branch's BatchNorm sees all images, as in the paper's Keras model); fast evaluation groups
  the images by the node's decision and runs each branch on its own images only.
- Deeper trees (`--depth D`) are supported: `--split` and `--extra-blocks` then take one value
  per level (split points increasing); a level-l group's edge runs from split[l-1] to split[l]
  when it has subgroups and to the backbone's end when its children are classes. The paper
  gives no depth > 1 settings; grouping.py documents how deeper levels are grouped.
- The super-class accuracy is the top node's routing decision against the true group (the
  authors' code reports it as A_pred). `--tree-from dataset` (not in the paper, which allows a
  manual hierarchy) uses the dataset's own coarse levels nearest the leaves, e.g. shapes'
  shape_fill (12 groups of 6) at depth 1.
- Split/extra defaults follow Tables 1-2 per n (ReLU: 5/9/12/16/38 and 2/3/4/5/4; ELU:
  6/9/15/19/38 and 2/3/2/5/4 with p_min 0.005); other n need explicit `--split`/`--extra-blocks`.
- Augmentation: flip and translation by 0.125 of the side (4 px at 32), border filled with grey
  (128), on the GPU loader.
"""

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import grouping

# Tables 1 and 2 and section 5.7: per n, the split point and the super-class node's extra
# blocks, both counted in residual blocks.
PAPER_SETTINGS = {
    False: {3: (5, 2), 5: (9, 3), 7: (12, 4), 9: (16, 5), 18: (38, 4)},
    True: {3: (6, 2), 5: (9, 3), 7: (15, 2), 9: (19, 5), 18: (38, 4)},
}
PAPER_P_MIN = {False: 0.0075, True: 0.005}
# Table 1 / 2 test accuracies (ResNet, slow, fast) on CIFAR-100.
PAPER_TABLE = {
    False: {
        3: (65.96, 68.89, 68.08),
        5: (67.08, 70.65, 70.45),
        7: (68.12, 71.25, 70.75),
        9: (68.38, 72.15, 72.01),
        18: (71.33, 73.45, 73.27),
    },
    True: {
        3: (65.54, 68.30, 68.16),
        5: (67.88, 70.71, 70.43),
        7: (68.79, 70.83, 70.79),
        9: (69.03, 72.47, 72.29),
        18: (72.93, 74.37, 74.15),
    },
}
# Iteration schedules at batch 128: (nominal run length, lr boundaries).
SCHEDULES = {"paper": (64000, (2000, 32000, 48000)), "code": (78000, (2000, 34000, 50000))}


def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, epochs=None, batch_size=128, lr=0.1, dataset="cifar100")
    g = parser.add_argument_group("hiernet")
    g.add_argument("--n", type=int, default=3, help="CIFAR ResNet size: 6n+2 layers, 3n residual blocks")
    g.add_argument("--elu", action="store_true", help="the ELU ResNet of Shah et al. (Table 2)")
    g.add_argument(
        "--split",
        type=int,
        nargs="+",
        default=None,
        help="residual blocks before each level's nodes (default: the paper's, per n)",
    )
    g.add_argument(
        "--extra-blocks",
        type=int,
        nargs="+",
        default=None,
        help="extra blocks of each level's node classifier (default: the paper's, per n)",
    )
    g.add_argument("--depth", type=int, default=1, help="levels of groups (1: root -> groups -> classes)")
    g.add_argument("--g-max", type=int, nargs="+", default=[50], help="largest group (per level; grouping.py)")
    g.add_argument(
        "--p-min",
        type=float,
        nargs="+",
        default=None,
        help="proximity a merge must exceed (per level; default 0.0075, 0.005 with --elu)",
    )
    g.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="run length in iterations (default 64000; 78000 with --schedule code)",
    )
    g.add_argument("--backbone-iterations", type=int, default=None, help="backbone run length (default --iterations)")
    g.add_argument(
        "--schedule",
        default="paper",
        choices=tuple(SCHEDULES),
        help="paper: the text's schedule, coupled wd 1e-4; code: the authors' code's",
    )
    g.add_argument("--weight-decay", type=float, default=1e-4, help="coupled L2 of --schedule paper")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument(
        "--backbone-ckpt", default=None, help="a trained backbone (fit checkpoint or state dict): skip stage 1"
    )
    g.add_argument("--cpm", default=None, help="a saved CPM (.npy): skip stage 2")
    g.add_argument("--groups", default=None, help="a tree JSON from grouping.py: skip stages 2-3")
    g.add_argument(
        "--tree-from",
        default="cpm",
        choices=("cpm", "dataset"),
        help="cpm: the paper's grouping; dataset: the dataset's own hierarchy",
    )
    g.add_argument("--eval-batch-size", type=int, default=1000)
    # No run length grows on resume: the tree and HierNet are built from the trained backbone.
    args = common.parse_args(parser, argv, script="hiernet", resume_longer=())

    blocks = 3 * args.n
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    if args.depth < 1:
        parser.error(f"--depth must be at least 1, got {args.depth}")
    defaults = PAPER_SETTINGS[args.elu].get(args.n)
    if args.split is None:
        if defaults is None or args.depth > 1:
            parser.error(
                f"no paper default split for --n {args.n} --depth {args.depth}; "
                f"pass --split with {args.depth} value(s) in 1..{blocks - 1}"
            )
        args.split = [defaults[0]]
    if args.extra_blocks is None:
        if defaults is None:
            parser.error(f"no paper default for --n {args.n}; pass --extra-blocks")
        args.extra_blocks = [defaults[1]]
    if len(args.split) != args.depth:
        parser.error(f"--split needs one value per level: {args.depth} for --depth {args.depth}, got {args.split}")
    if len(args.extra_blocks) == 1:
        args.extra_blocks = args.extra_blocks * args.depth
    if len(args.extra_blocks) != args.depth:
        parser.error(f"--extra-blocks takes 1 or {args.depth} values, got {args.extra_blocks}")
    for level, (split, extra) in enumerate(zip(args.split, args.extra_blocks)):
        low = args.split[level - 1] + 1 if level else 1
        if not low <= split <= blocks - 1:
            parser.error(
                f"--split {split}: valid range is {low}..{blocks - 1} (the backbone n={args.n} has "
                f"{blocks} residual blocks; a branch needs at least one, split points increase)"
            )
        if not 0 <= extra <= blocks - split:
            parser.error(f"--extra-blocks {extra} at split {split}: valid range is 0..{blocks - split}")
    if args.p_min is None:
        args.p_min = [PAPER_P_MIN[args.elu]]
    if len(args.g_max) > args.depth or len(args.p_min) > args.depth:
        parser.error(f"--g-max / --p-min take at most one value per level (--depth {args.depth})")
    for name in ("iterations", "backbone_iterations", "epochs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return args


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------


class TreeNode(nn.Module):
    """One node of the tree with its incoming edge.

    edge: the residual blocks from the parent's features to this node's; classifier: extra
    blocks (section 3.3) -> GAP -> FC over the children. A leaf group's children are classes
    (its FC outputs them); an inner node's children are TreeNodes."""

    def __init__(self, edge, extra, fc, branches=None, classes=None):
        super().__init__()
        self.edge, self.extra, self.fc = edge, extra, fc
        self.branches = nn.ModuleList(branches) if branches else None
        self.classes = list(classes) if branches is None else [c for b in branches for c in b.classes]
        # Where each child's leaves start in this node's (tree-ordered) output.
        sizes = [len(b.classes) for b in branches] if branches else [1] * len(self.classes)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()

    @property
    def is_leaf_group(self):
        return self.branches is None

    def classify(self, h):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.extra(h), 1), 1))

    def log_probs(self, x):
        """log p of every leaf under this node (tree order) and this node's logits; every
        branch runs on the whole batch."""
        h = self.edge(x)
        logits = self.classify(h)
        log_p = F.log_softmax(logits.float(), 1)
        if self.is_leaf_group:
            return log_p, logits
        parts = [log_p[:, i : i + 1] + branch.log_probs(h)[0] for i, branch in enumerate(self.branches)]
        return torch.cat(parts, 1), logits

    def route(self, x):
        """Algorithm 1: the tree position (within this node) of each image's predicted leaf,
        every branch run only on the images routed to it."""
        h = self.edge(x)
        choice = self.classify(h).argmax(1)
        if self.is_leaf_group:
            return choice
        out = torch.empty_like(choice)
        by_choice = torch.argsort(choice)
        counts = torch.bincount(choice, minlength=len(self.branches)).tolist()  # one host sync per node
        start = 0
        for branch, offset, count in zip(self.branches, self.offsets, counts):
            if count:
                idx = by_choice[start : start + count]
                out[idx] = branch.route(h[idx]) + offset
            start += count
        return out

    def leaf_group_outputs(self, x):
        """[(classes, pooled features, logits)] of every leaf group: its root-to-leaf path."""
        h = self.edge(x)
        if self.is_leaf_group:
            pooled = torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)
            return [(self.classes, pooled, self.fc(pooled))]
        return [out for branch in self.branches for out in branch.leaf_group_outputs(h)]


class HierNet(nn.Module):
    """The tree of TreeNodes; the top node's edge is the stem and the shared trunk.

    forward(x) is the slow evaluation: log p over the classes in tree order. `order[t]` is the
    dataset class at tree position t, `rank[c]` the tree position of class c."""

    def __init__(self, root, num_classes):
        super().__init__()
        self.root = root
        order = torch.tensor(root.classes, dtype=torch.long)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer(
            "rank", torch.empty_like(order).scatter_(0, order, torch.arange(num_classes)), persistent=False
        )

    def forward(self, x):
        return self.root.log_probs(x)[0]

    def outputs(self, x):
        """(log p in tree order, the super-class node's logits)."""
        return self.root.log_probs(x)

    def route(self, x):
        """Fast evaluation: the predicted tree position per image."""
        return self.root.route(x)


def channels_after(backbone, k):
    """Feature channels after the stem and the first k residual blocks."""
    return backbone.blocks[k - 1].bn2.num_features if k else backbone.stem[1].num_features


def build_node(subtree, backbone, splits, extras, level, start, prefix=()):
    """Copy the backbone's modules into the node for `subtree` at `level` whose edge starts
    after block `start`."""
    blocks = backbone.blocks
    if grouping.is_leaf_group(subtree):
        edge = nn.Sequential(*prefix, *copy.deepcopy(blocks[start:]))
        fc = nn.Linear(backbone.head.fc.in_features, len(subtree))
        with torch.no_grad():  # the backbone FC rows of this group's classes
            fc.weight.copy_(backbone.head.fc.weight[subtree])
            fc.bias.copy_(backbone.head.fc.bias[subtree])
        return TreeNode(edge, nn.Sequential(), fc, classes=subtree)
    end = splits[level]
    edge = nn.Sequential(*prefix, *copy.deepcopy(blocks[start:end]))
    extra = nn.Sequential(*copy.deepcopy(blocks[end : end + extras[level]]))
    fc = nn.Linear(channels_after(backbone, end + extras[level]), len(subtree))  # new: PyTorch default init
    branches = [build_node(child, backbone, splits, extras, level + 1, end) for child in subtree]
    return TreeNode(edge, extra, fc, branches=branches)


def build_hiernet(backbone, tree, splits, extras):
    """HierNet with every root-to-leaf path a copy of the backbone (section 5.4: transfer)."""
    if grouping.tree_depth(tree) > len(splits):
        common.fail(
            f"the tree has {grouping.tree_depth(tree)} levels of groups but --split gives {len(splits)}; "
            f"pass --depth {grouping.tree_depth(tree)} and one --split per level"
        )
    backbone = copy.deepcopy(backbone).cpu().float()
    root = build_node(tree, backbone, splits, extras, 0, 0, prefix=[copy.deepcopy(backbone.stem)])
    return HierNet(root, backbone.head.fc.out_features)


# ---------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------


class SGDDecoupledDecay(torch.optim.SGD):
    """SGD with momentum and decoupled weight decay proportional to the learning rate
    (p <- p (1 - decay_per_lr * lr) before each step), as the authors' code's SGDW with
    weight decay 1e-5/1e-4/1e-5/1e-6 at lr 0.01/0.1/0.01/0.001."""

    def __init__(self, params, lr, momentum, decay_per_lr):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        self.decay_per_lr = decay_per_lr

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                torch._foreach_mul_(params, 1.0 - self.decay_per_lr * group["lr"])
        return super().step(closure)


def make_optimizer(args, model):
    if args.schedule == "code":
        return SGDDecoupledDecay(model.parameters(), args.lr, args.momentum, decay_per_lr=1e-3)
    return common.make_sgd(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def make_schedule(args, steps_per_epoch, iterations):
    """(epochs, lr_at): the paper's iteration schedule scaled to the run length."""
    nominal, boundaries = SCHEDULES[args.schedule]
    if args.epochs:
        epochs, total = args.epochs, args.epochs * steps_per_epoch
    else:
        total = iterations or nominal
        epochs = math.ceil(total / steps_per_epoch)
    scale = total / nominal
    values = [args.lr / 10, args.lr, args.lr / 10, args.lr / 100]
    return epochs, common.piecewise_lr([max(1, round(b * scale)) for b in boundaries], values)


def hiernet_loss(model, x, y):
    """Cross-entropy on the product probabilities; y is the tree-ordered label."""
    log_p = model(x)
    return F.nll_loss(log_p, y), {"correct": (log_p.argmax(1) == y).sum()}


def evaluate_hiernet(model, loader, group_of, *, device, dtype):
    """Slow, fast and super-class predictions in dataset class indices, plus log p (dataset
    class order) and the labels."""
    (log_p, super_logits), labels = common.predict(model.outputs, loader, device=device, dtype=dtype)
    routed, _ = common.predict(model.route, loader, device=device, dtype=dtype)
    order = model.order.cpu()
    log_p_classes = log_p[:, model.rank.cpu()]  # columns back in dataset order
    return {
        "log_p": log_p_classes,
        "labels": labels,
        "slow": order[log_p.argmax(1)],
        "fast": order[routed.round().long()],
        "super": super_logits.argmax(1),
        "super_true": torch.as_tensor(group_of)[labels],
    }


def percent(mask):
    return 100.0 * mask.float().mean().item() if len(mask) else float("nan")


def train_backbone(args, data, train_loader, val_loader, run_dir, device):
    backbone = common.CifarResNet(args.n, data.num_classes, elu=args.elu, in_channels=data.train.images.shape[1])
    backbone = common.to_device_model(backbone, device)
    if args.backbone_ckpt:
        path = Path(args.backbone_ckpt)
        if not path.is_file():
            common.fail(f"--backbone-ckpt {path}: file not found")
        state = common.load_checkpoint(path, device)
        try:
            backbone.load_state_dict(state.get("model", state))
        except RuntimeError as e:
            common.fail(
                f"--backbone-ckpt {path}: does not fit CifarResNet(n={args.n}, elu={args.elu}, "
                f"{data.num_classes} classes): {str(e).splitlines()[0]}"
            )
        return backbone.eval(), []
    optimizer = make_optimizer(args, backbone)
    epochs, lr_at = make_schedule(args, len(train_loader), args.backbone_iterations or args.iterations)
    step = common.make_train_step(
        backbone, common.cross_entropy_loss, optimizer, device=device, dtype=args.dtype, cuda_graph=args.cuda_graph
    )

    def evaluate(epoch):
        logits, labels = common.predict(backbone, val_loader, device=device, dtype=args.dtype)
        return {"val_acc": common.accuracy(logits, labels)}

    history = common.fit(
        run_dir / "backbone",
        backbone,
        optimizer,
        step,
        train_loader,
        epochs=epochs,
        lr_at=lr_at,
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage="backbone",
    )
    return backbone.eval(), history


def make_tree(args, data, backbone, val_loader, run_dir, device):
    """Stages 2-3: the CPM on the validation split (saved as cpm.npy) and the grouping, or the given tree."""
    saved = run_dir / "tree.json"
    if args.resume and saved.is_file():  # the HierNet checkpoint was built on this tree
        return grouping.load_tree(saved, data.num_classes)
    if args.groups:
        return grouping.load_tree(args.groups, data.num_classes)
    if args.tree_from == "dataset":
        hierarchy = data.hierarchy
        if hierarchy.n_levels - 1 < args.depth:
            common.fail(
                f"--tree-from dataset --depth {args.depth}: {data.name} has only "
                f"{hierarchy.n_levels - 1} coarse level(s)"
            )
        levels = list(range(hierarchy.n_levels - 1 - args.depth, hierarchy.n_levels - 1))
        return dataset_tree(hierarchy, levels, np.arange(data.num_classes))
    if args.cpm:
        cpm = np.load(args.cpm)
        if cpm.shape != (data.num_classes, data.num_classes):
            common.fail(f"--cpm {args.cpm}: shape {cpm.shape}, expected {data.num_classes} x {data.num_classes}")
    else:
        cpm = grouping.confusion_probability_matrix(
            backbone, val_loader, data.num_classes, device=device, dtype=args.dtype
        )
    common.write_npy(run_dir / "cpm.npy", cpm)
    return grouping.build_tree(cpm, args.depth, args.g_max, args.p_min)


def dataset_tree(hierarchy, levels, classes):
    """Nested groups from the hierarchy's coarse `levels` (coarsest first) over `classes`."""
    parent = hierarchy.parents[levels[0]][classes]
    groups = [classes[parent == p] for p in np.unique(parent)]
    if len(levels) == 1:
        return [g.tolist() for g in groups]
    return [dataset_tree(hierarchy, levels[1:], g) for g in groups]


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "hiernet")
    max_batches = 2 if args.dry_run else None
    data = common.load_data(args)
    val_idx, test_idx = common.split_half(data.test.labels.numpy(), args.seed)
    if len(val_idx) == 0:
        common.fail(
            f"the test set ({len(data.test)} images) has a class with fewer than 2 images; "
            "it cannot be halved into validation and test (raise --test-size)"
        )
    val, test = data.test.subset(val_idx), data.test.subset(test_idx)
    size = data.train.images.shape[-1]
    print(
        f"[hiernet] {data.name}: {len(data.train)} train, {len(val)} validation, {len(test)} test, "
        f"{data.num_classes} classes, {size}px",
        flush=True,
    )

    def loader(split, labels=None, train=False, seed=0):
        return common.GpuLoader(
            split.images,
            split.labels if labels is None else labels,
            args.batch_size if train else args.eval_batch_size,
            device=device,
            mean=data.mean,
            std=data.std,
            train=train,
            crop_pad=round(0.125 * size),
            fill=128,
            flip=train,
            seed=args.seed + seed,
            max_batches=max_batches,
            channels_last=device.type == "cuda",
        )  # channels_last is slow on the CPU

    val_loader, test_loader = loader(val), loader(test)

    # 1. Backbone.
    backbone, backbone_history = train_backbone(args, data, loader(data.train, train=True), val_loader, run_dir, device)

    # 2-3. CPM and grouping.
    tree = make_tree(args, data, backbone, val_loader, run_dir, device)
    names = data.class_names
    text = grouping.tree_text(tree, names)
    print(text, end="", flush=True)
    common.write_json(
        run_dir / "tree.json",
        grouping.tree_json(tree, names, g_max=args.g_max, p_min=args.p_min, source=args.groups or args.tree_from),
    )
    common.atomic_write_bytes(run_dir / "tree.txt", text.encode())
    common.atomic_write_bytes(run_dir / "tree.dot", grouping.tree_dot(tree, names).encode())
    if len(tree) == 1:
        print(
            "[hiernet] warning: one group only; the super-class node has nothing to decide "
            "(lower --g-max or raise --p-min)",
            flush=True,
        )
    if len(tree) > 16:  # e.g. a near-perfect backbone on easy data: few confusions, many singletons
        print(
            f"[hiernet] warning: {len(tree)} groups; every branch runs on every image in training, so the cost "
            "grows with the group count (lower --p-min)",
            flush=True,
        )
    top_groups = [grouping.tree_leaves(child) for child in tree]
    group_of = np.zeros(data.num_classes, dtype=np.int64)
    for g, classes in enumerate(top_groups):
        group_of[classes] = g

    # 4. HierNet from the backbone's weights.
    model = common.to_device_model(build_hiernet(backbone, tree, args.split, args.extra_blocks), device)
    print(
        f"[hiernet] backbone {common.count_params(backbone) / 1e6:.3f}M parameters, HierNet "
        f"{common.count_params(model) / 1e6:.3f}M, {len(tree)} groups",
        flush=True,
    )

    # 5. End-to-end training on tree-ordered labels.
    rank = model.rank.cpu()
    train_loader = loader(data.train, labels=rank[data.train.labels], train=True, seed=1)
    optimizer = make_optimizer(args, model)
    epochs, lr_at = make_schedule(args, len(train_loader), args.iterations)
    step = common.make_train_step(
        model, hiernet_loss, optimizer, device=device, dtype=args.dtype, cuda_graph=args.cuda_graph
    )

    def evaluate(epoch):
        out = evaluate_hiernet(model, val_loader, group_of, device=device, dtype=args.dtype)
        return {
            "val_slow_acc": percent(out["slow"] == out["labels"]),
            "val_fast_acc": percent(out["fast"] == out["labels"]),
            "val_super_acc": percent(out["super"] == out["super_true"]),
        }

    hiernet_history = common.fit(
        run_dir / "hiernet",
        model,
        optimizer,
        step,
        train_loader,
        epochs=epochs,
        lr_at=lr_at,
        evaluate=evaluate,
        log_path=run_dir / "metrics.jsonl",
        stage="hiernet",
    )

    # 6. Evaluation on the test half, once.
    backbone_logits, labels = common.predict(backbone, test_loader, device=device, dtype=args.dtype)
    out = evaluate_hiernet(model, test_loader, group_of, device=device, dtype=args.dtype)
    backbone_pred = backbone_logits.argmax(1)
    metrics = {
        "dataset": data.name,
        "n": args.n,
        "elu": args.elu,
        "split": args.split,
        "extra_blocks": args.extra_blocks,
        "depth": grouping.tree_depth(tree),
        "n_groups": len(tree),
        "group_sizes": [len(g) for g in top_groups],
        "test_images": len(labels),
        "backbone_acc": percent(backbone_pred == labels),
        "slow_acc": percent(out["slow"] == labels),
        "fast_acc": percent(out["fast"] == labels),
        "superclass_acc": percent(out["super"] == out["super_true"]),
        "backbone_superclass_acc": percent(torch.as_tensor(group_of)[backbone_pred] == out["super_true"]),
        "fast_equals_slow": percent(out["fast"] == out["slow"]),
    }
    if data.hierarchy.n_levels > 1:
        metrics["level_acc_backbone"] = common.level_accuracies(backbone_logits, labels, data.hierarchy)
        metrics["level_acc_slow"] = common.level_accuracies(out["log_p"], labels, data.hierarchy)
    last = {k: v for k, v in (hiernet_history[-1] if hiernet_history else {}).items() if k.startswith("val_")}
    metrics.update(last)
    for name, history in (("backbone", backbone_history), ("hiernet", hiernet_history)):
        seconds = [r["seconds"] for r in history[1:] or history]  # the first epoch includes graph capture
        if seconds:
            metrics[f"{name}_epoch_seconds"] = float(np.median(seconds))
            metrics[f"{name}_epochs"] = len(history)
    metrics["backbone_params"] = common.count_params(backbone)
    metrics["hiernet_params"] = common.count_params(model)

    # Images/s: one batch of test images through each form of inference.
    x = next(iter(test_loader))[0]
    timing = {"iters": 20, "warmup": 5}
    if device.type != "cuda":  # a rough CPU figure only; keeps CPU runs and tests short
        x, timing = x[:64], {"iters": 2, "warmup": 1}
    for name, forward in (("backbone", backbone), ("slow", model), ("fast", model.route)):
        metrics[f"{name}_images_per_s"] = common.measure_throughput(
            forward, x, device=device, dtype=args.dtype, **timing
        )
    metrics["throughput_batch"] = len(x)
    if data.name == "cifar100" and args.n in PAPER_TABLE[args.elu]:
        metrics["paper_table"] = dict(zip(("backbone_acc", "slow_acc", "fast_acc"), PAPER_TABLE[args.elu][args.n]))

    # 7. Per-group accuracies and the final metrics.
    per_group, lines = (
        [],
        [f"{'group':>6} {'classes':>7} {'images':>6} {'backbone':>8} {'slow':>6} {'fast':>6} {'routed':>6}  names"],
    )
    for g, classes in enumerate(top_groups):
        mask = torch.as_tensor(group_of)[labels] == g
        row = {
            "group": g + 1,
            "classes": classes,
            "names": [names[c] for c in classes],
            "images": int(mask.sum()),
            "backbone_acc": percent((backbone_pred == labels)[mask]),
            "slow_acc": percent((out["slow"] == labels)[mask]),
            "fast_acc": percent((out["fast"] == labels)[mask]),
            "routed_acc": percent((out["super"] == g)[mask]),
        }
        per_group.append(row)
        lines.append(
            f"{g + 1:>6} {len(classes):>7} {row['images']:>6} {row['backbone_acc']:>8.2f} {row['slow_acc']:>6.2f} "
            f"{row['fast_acc']:>6.2f} {row['routed_acc']:>6.2f}  {', '.join(row['names'])}"
        )
    common.write_json(run_dir / "per_group.json", per_group)
    common.atomic_write_bytes(run_dir / "per_group.txt", ("\n".join(lines) + "\n").encode())
    common.write_json(run_dir / "metrics.json", metrics)
    print("\n".join(lines))
    print(
        f"[hiernet] test: backbone {metrics['backbone_acc']:.2f}  slow {metrics['slow_acc']:.2f}  "
        f"fast {metrics['fast_acc']:.2f}  super-class {metrics['superclass_acc']:.2f} | images/s backbone "
        f"{metrics['backbone_images_per_s']:.0f} slow {metrics['slow_images_per_s']:.0f} fast "
        f"{metrics['fast_images_per_s']:.0f} | {run_dir}",
        flush=True,
    )
    return metrics


if __name__ == "__main__":
    main()
