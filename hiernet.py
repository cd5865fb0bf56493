"""HierNet: Image Recognition with Hierarchical Convolutional Networks (Tempfli & Sandor).

A trained CIFAR ResNet is cut into a tree: a shared trunk, a super-class node that routes to groups
of confusable classes (found from the backbone's confusion probability matrix, section 4), one
branch per group; every root-to-leaf path starts as the backbone, then the tree trains end to end on
the product of the nodes' softmaxes (section 3.2). Full account of every choice: docs/hiernet.md.

    python hiernet.py --dataset cifar100 --n 9 --split 16       # the paper's Table 1 run, n = 9
    python hiernet.py --dataset shapes --image-size 32 --n 3 --iterations 4000   # quick, offline

Pipeline (`main`; a stage is skipped when its output is given): 1. backbone (`--backbone-ckpt`);
2. CPM on the validation half (`--cpm`); 3. grouping into a tree (`--groups`, `--tree-from`);
4. HierNet from the backbone's weights; 5. end-to-end training; 6. the test half, once. Outputs:
tree.json/.txt/.dot, cpm.npy, per_group.json/.txt, metrics.jsonl (per epoch), metrics.json; Table 1 / 2 beside
the paper's: python tools/results_table.py --run RUN_DIR.

Paper vs ours, one line per decision (the reasons: docs/hiernet.md, "Paper vs ours"):
- schedule: the text's (64k iterations, coupled wd 1e-4) scaled to --iterations; --schedule code (`make_schedule`)
- backbone warm-up only for n = 18 as the paper; --backbone-warmup always (`stage_schedule`)
- test set halved per class: the authors' CIFAR-100 halves or seeded; no early stopping (`test_halves`)
- labels stay; the model keeps `order` / `rank` (the paper's reordering), outputs mapped back (`evaluate_hiernet`)
- --elu: Shah et al.'s ELU ResNet, ELU before pooling by default (--elu-head, the authors' code) (`make_backbone`)
- shortcuts: option A (He et al.) by default; --shortcut B, the authors' 1x1 conv + BN (`make_backbone`)
- weight transfer: every path a copy of the backbone, leaf FCs its rows; --leaf-init fresh, --no-transfer (`build_node`)
- loss: sum of log-softmaxes along the path, NLL = CE on the product of softmaxes, stable (`hiernet_loss`)
- slow forward: every branch on the whole batch, run batched per level (`HierNet`, equal to `PerBranchHierNet`)
- fast evaluation: --fast-mode all (default, faster on the H100) or sorted (Algorithm 1's cost) (`HierNet.route`)
- CPM and every reported accuracy in exact fp32; training and the per-epoch curve in --dtype (`exact_fp32`)
- --control (ours): the backbone trained on as long, beside HierNet (`main`, stage 1)
- metrics.json "hierarchical": metrics under the found groups and the dataset's (`hierarchical_report`)
- --depth D > 1 (ours: the paper gives no settings): one --split / --extra-blocks per level (`check_args`)
- super-class: the top node's routing decision (the authors' A_pred); --tree-from dataset (ours) (`grouping.run_tree`)
- --tree-from random (ours): the CPM tree's group sizes, classes assigned at random, a control (`grouping.run_tree`)
- split / extra blocks / p_min defaults: Tables 1-2 per n (`PAPER_SETTINGS`, `PAPER_P_MIN`)
- augmentation: flip and 4 px translation (0.125 of the side), grey border, on the GPU loader (`make_loader`)
"""

import argparse
import base64
import contextlib
import copy
import functools
import itertools
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


# Iteration schedules at batch 128: (nominal run length, lr boundaries).
SCHEDULES = {"paper": (64000, (2000, 32000, 48000)), "code": (78000, (2000, 34000, 50000))}


def get_args(argv=None):
    """The flags: the shared ones (common.add_common_args) and HierNet's own; the paper-fidelity and ablation
    flags in their own group (docs/hiernet.md, "Paper vs ours", gives each one's reason)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(parser, epochs=None, batch_size=128, lr=0.1, dataset="cifar100")
    pos, nonneg, text = common.positive_int, common.nonneg_int, common.nonempty
    g = parser.add_argument_group("hiernet")
    g.add_argument("--n", type=pos, default=3, help="CIFAR ResNet size: 6n+2 layers, 3n residual blocks")
    g.add_argument("--elu", action="store_true", help="the ELU ResNet of Shah et al. (Table 2)")
    g.add_argument("--split", type=pos, nargs="+", help="residual blocks before each level's nodes (default: paper's)")
    g.add_argument("--extra-blocks", type=nonneg, nargs="+", help="extra blocks of each level's node (paper's)")
    g.add_argument("--depth", type=pos, default=1, help="levels of groups (1: root -> groups -> classes)")
    g.add_argument("--g-max", type=pos, nargs="+", default=[50], help="largest group (per level; grouping.py)")
    g.add_argument("--p-min", type=common.nonneg_float, nargs="+", help="merge proximity per level (0.0075; ELU 0.005)")
    g.add_argument("--iterations", type=pos, help="run length in iterations (64000; code: 78000)")
    g.add_argument("--backbone-iterations", type=pos, help="backbone run length (default --iterations)")
    g.add_argument("--weight-decay", type=common.nonneg_float, default=1e-4, help="coupled L2 of --schedule paper")
    g.add_argument("--momentum", type=common.fraction, default=0.9)
    g.add_argument("--backbone-ckpt", type=text, help="a trained backbone (fit checkpoint or state dict): skip stage 1")
    g.add_argument("--cpm", type=grouping.cpm_file, help="a saved CPM (.npy): skip stage 2")
    g.add_argument("--groups", type=text, help="a tree JSON from grouping.py: skip stages 2-3")
    g.add_argument("--eval-batch-size", type=pos, default=1000)
    p = parser.add_argument_group("paper fidelity and ablations (docs/hiernet.md, 'Paper vs ours')")
    p.add_argument("--schedule", default="paper", choices=tuple(SCHEDULES), help="paper: the text's; code: authors'")
    p.add_argument("--tree-from", default="cpm", choices=("cpm", "dataset", "random"), help="random: a control")
    p.add_argument("--elu-head", action=argparse.BooleanOptionalAction, default=True, help="--elu: ELU before pooling")
    p.add_argument("--backbone-warmup", default="paper", choices=("paper", "always"), help="paper: only for n = 18")
    p.add_argument("--shortcut", default="A", choices=("A", "B"), help="A: zero padding (He); B: 1x1 conv + BN")
    p.add_argument("--leaf-init", default="backbone", choices=("backbone", "fresh"), help="leaf FCs: backbone rows")
    p.add_argument("--no-transfer", action="store_true", help="HierNet from fresh weights, not the trained backbone")
    p.add_argument("--test-halves", choices=("authors", "seeded"), help="authors' (default for cifar100) or seeded")
    p.add_argument("--control", action="store_true", help="also train the backbone on for HierNet's iterations")
    p.add_argument("--fast-mode", default="all", choices=("sorted", "all"), help="fast: routed branch only, or all")
    # No run length grows on resume: the tree and HierNet are built from the trained backbone.
    # A --dry-run's own default (flag not given): 720 test images, so that every shapes class can be halved.
    # A run from before --elu-head / --shortcut had neither (no ELU before pooling, option A).
    older = {"elu_head": False, "shortcut": "A"}
    args = common.parse_args(
        parser, argv, script="hiernet", resume_longer=(), dry_run={"test_size": 720}, before_flags=older
    )
    return check_args(parser, args)


def check_args(parser, args):
    """Defaults that depend on other flags (the paper's per n) and the range checks."""
    if args.test_halves is None:
        args.test_halves = "authors" if args.dataset == "cifar100" else "seeded"
    if args.test_halves == "authors" and args.dataset != "cifar100":
        parser.error(
            f"--test-halves authors: the authors' halves are CIFAR-100's; --dataset {args.dataset} needs seeded"
        )

    blocks = 3 * args.n
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
    # Before stage 1 trains, not after (a resume reads its own tree.json, not --groups).
    for flag, path in (("--groups", None if args.resume else args.groups), ("--backbone-ckpt", args.backbone_ckpt)):
        if path and not Path(path).is_file():
            parser.error(f"{flag} {path}: file not found")
    if args.p_min is None:
        args.p_min = [PAPER_P_MIN[args.elu]]
    if len(args.g_max) > args.depth or len(args.p_min) > args.depth:
        parser.error(f"--g-max / --p-min take at most one value per level (--depth {args.depth})")
    return args


# --------------------------------------------------------------------------------------------------
# The method: HierNet as the paper's tree (sections 3.1-3.3), Algorithm 1, the loss (section 3.2)
# --------------------------------------------------------------------------------------------------


class TreeNode(nn.Module):
    """One node of the per-branch tree (the readable reference form) with its incoming edge.

    edge: the residual blocks from the parent's features to this node's; classifier: extra
    blocks (section 3.3) -> GAP -> FC over the children. A leaf group's children are classes
    (its FC outputs them; its `extra` is the backbone head's activation before pooling, the ELU
    of the authors' ELU ResNet or nothing); an inner node's children are TreeNodes."""

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
        """Algorithm 1 (the reference; HierNet.route_all / route_sorted are its batched forms): the tree
        position (within this node) of each image's predicted leaf, every branch run only on the images
        routed to it."""
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


class PerBranchHierNet(nn.Module):
    """The tree of TreeNodes, one module per branch: the readable reference of `HierNet`.

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

    def route(self, x):
        """Fast evaluation: the predicted tree position per image."""
        return self.root.route(x)


def channels_after(backbone, k):
    """Feature channels after the stem and the first k residual blocks."""
    return backbone.blocks[k - 1].bn2.num_features if k else backbone.stem[1].num_features


def build_node(subtree, backbone, splits, extras, level, start, prefix=(), leaf_init="backbone"):
    """Copy the backbone's modules into the node for `subtree` at `level` whose edge starts
    after block `start`."""
    blocks = backbone.blocks
    if grouping.is_leaf_group(subtree):
        edge = nn.Sequential(*prefix, *copy.deepcopy(blocks[start:]))
        fc = nn.Linear(backbone.head.fc.in_features, len(subtree))  # fresh: PyTorch default init
        if leaf_init == "backbone":
            with torch.no_grad():  # the backbone FC rows of this group's classes
                fc.weight.copy_(backbone.head.fc.weight[subtree])
                fc.bias.copy_(backbone.head.fc.bias[subtree])
        return TreeNode(edge, copy.deepcopy(backbone.head.pre), fc, classes=subtree)
    end = splits[level]
    edge = nn.Sequential(*prefix, *copy.deepcopy(blocks[start:end]))
    extra = nn.Sequential(*copy.deepcopy(blocks[end : end + extras[level]]))
    fc = nn.Linear(channels_after(backbone, end + extras[level]), len(subtree))  # new: PyTorch default init
    branches = [build_node(child, backbone, splits, extras, level + 1, end, leaf_init=leaf_init) for child in subtree]
    return TreeNode(edge, extra, fc, branches=branches)


def build_per_branch(backbone, tree, splits, extras, leaf_init="backbone"):
    """The per-branch HierNet with every root-to-leaf path a copy of the backbone (section 5.4:
    transfer); `leaf_init="fresh"` leaves the leaf FCs at PyTorch's default init."""
    if grouping.tree_depth(tree) > len(splits):
        common.fail(
            f"the tree has {grouping.tree_depth(tree)} levels of groups but --split gives {len(splits)}; "
            f"pass --depth {grouping.tree_depth(tree)} and one --split per level"
        )
    backbone = copy.deepcopy(backbone).cpu().float()
    root = build_node(tree, backbone, splits, extras, 0, 0, prefix=[copy.deepcopy(backbone.stem)], leaf_init=leaf_init)
    return PerBranchHierNet(root, backbone.head.fc.out_features)


def hiernet_loss(model, x, y):
    """Cross-entropy on the product probabilities; y is the tree-ordered label."""
    log_p = model(x)
    return F.nll_loss(log_p, y), {"correct": (log_p.argmax(1) == y).sum()}


# --------------------------------------------------------------------------------------------------
# The batched form that trains: the same HierNet with every branch of a tree level run as one computation
# (grouped convolutions, stacked BatchNorm and FCs). It equals PerBranchHierNet above, weights and function:
# tests/test_hiernet.py::test_batched_model_gives_the_per_branch_logits_and_gradients (logits, gradients) and
# ::test_fast_evaluation_equals_algorithm_1_image_by_image (HierNet.route_all / route_sorted are Algorithm 1,
# TreeNode.route, in batched form: the same routed positions, image by image).
# --------------------------------------------------------------------------------------------------


def stacked_conv(convs, shared_input=False):
    """G convolutions as one: a grouped convolution (groups = G) over G x C input channels, or,
    when every branch reads the same input (`shared_input`), one convolution with G x C' outputs.
    The weight is the per-branch weights stacked along the output channels in both cases."""
    c, g = convs[0], len(convs)
    conv = nn.Conv2d(
        c.in_channels * (1 if shared_input else g),
        c.out_channels * g,
        c.kernel_size,
        c.stride,
        c.padding,
        groups=1 if shared_input else g,
        bias=False,
    )
    with torch.no_grad():
        conv.weight.copy_(torch.cat([m.weight for m in convs]))
    return conv


def stacked_bn(bns):
    """G BatchNorms as one over G x C channels: the statistics stay per branch and channel."""
    bn = nn.BatchNorm2d(sum(b.num_features for b in bns), eps=bns[0].eps, momentum=bns[0].momentum)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).copy_(torch.cat([getattr(b, name) for b in bns]))
        bn.num_batches_tracked.copy_(bns[0].num_batches_tracked)
    return bn


def conv_one(conv, x, g, groups):
    """Branch g's part of a stacked convolution on that branch's input alone."""
    n = conv.out_channels // groups
    return F.conv2d(x, conv.weight[g * n : (g + 1) * n], None, conv.stride, conv.padding)


def bn_one(bn, x, g, groups):
    """Branch g's part of a stacked BatchNorm, with running statistics (evaluation only)."""
    n = bn.num_features // groups
    s = slice(g * n, (g + 1) * n)
    return F.batch_norm(x, bn.running_mean[s], bn.running_var[s], bn.weight[s], bn.bias[s], False, 0.0, bn.eps)


class GroupedBlock(nn.Module):
    """G copies of a `common.CifarBasicBlock` (one per branch, same shapes) as one module.

    Input B x (G cin) x H x W (branch g's channels at g cin ... (g+1) cin), or B x cin x H x W
    with `shared_input` (every branch reads the same features, e.g. the trunk's); output
    B x (G cout) x H'. `forward_one(x, g)` runs branch g alone (evaluation)."""

    def __init__(self, blocks, shared_input=False):
        super().__init__()
        b0 = blocks[0]
        self.groups, self.shared_input, self.elu = len(blocks), shared_input, b0.elu
        self.cin, self.cout = b0.conv1.in_channels, b0.conv1.out_channels
        self.conv1 = stacked_conv([b.conv1 for b in blocks], shared_input)
        self.conv2 = stacked_conv([b.conv2 for b in blocks])
        self.bn1 = None if self.elu else stacked_bn([b.bn1 for b in blocks])
        self.bn2 = stacked_bn([b.bn2 for b in blocks])
        sc = b0.shortcut
        if isinstance(sc, nn.Sequential):  # option B: 1x1 convolution + BN
            self.stride, self.pad = sc[0].stride[0], 0
            self.shortcut = nn.Sequential(
                stacked_conv([b.shortcut[0] for b in blocks], shared_input), stacked_bn([b.shortcut[1] for b in blocks])
            )
        else:  # option A (subsample, zero channels) or identity
            self.stride, self.pad = (sc.stride, sc.extra) if isinstance(sc, common.ShortcutA) else (1, 0)
            self.shortcut = None

    def residual(self, x):
        if self.elu:
            return self.bn2(self.conv2(F.elu(self.conv1(x))))
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        out = self.residual(x)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        elif self.shared_input or self.stride > 1 or self.pad:
            # Option A per branch: subsample, pad each branch's channels; a shared input broadcasts.
            s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            B, _, H, W = out.shape
            s = s.reshape(B, 1 if self.shared_input else self.groups, self.cin, H, W)
            if self.pad:
                s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            out = (out.reshape(B, self.groups, self.cout, H, W) + s).reshape(B, self.groups * self.cout, H, W)
        else:
            out = out + x
        return out if self.elu else F.relu(out)

    def forward_one(self, x, g):
        G = self.groups
        out = conv_one(self.conv1, x, g, G)
        out = F.elu(out) if self.elu else F.relu(bn_one(self.bn1, out, g, G))
        out = bn_one(self.bn2, conv_one(self.conv2, out, g, G), g, G)
        if self.shortcut is not None:
            s = bn_one(self.shortcut[1], conv_one(self.shortcut[0], x, g, G), g, G)
        else:
            s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        out = out + s
        return out if self.elu else F.relu(out)


class GroupedStage(nn.Sequential):
    """Consecutive GroupedBlocks: the same blocks of G branches (empty: the identity)."""

    def __init__(self, block_lists, shared_input=False):
        # block_lists[g] = branch g's blocks, all of the same length and shapes.
        super().__init__(*[GroupedBlock(list(b), shared_input and i == 0) for i, b in enumerate(zip(*block_lists))])

    def forward_one(self, x, g):
        for block in self:
            x = block.forward_one(x, g)
        return x


class StackedLinear(nn.Module):
    """N linear layers over the same input size, with K_1..K_N outputs, as one N x K x C weight
    (K = the largest K_i). Input B x N x C, output B x N x K logits; a layer's padded outputs
    are -inf (zero probability, zero gradient), so a softmax over K is the softmax over K_i."""

    def __init__(self, linears):
        super().__init__()
        self.sizes = [m.out_features for m in linears]
        n, k, c = len(linears), max(self.sizes), linears[0].in_features
        self.weight = nn.Parameter(torch.zeros(n, k, c))
        self.bias = nn.Parameter(torch.zeros(n, k))
        pad = torch.full((n, k), -math.inf)
        with torch.no_grad():
            for i, m in enumerate(linears):
                self.weight[i, : m.out_features] = m.weight
                self.bias[i, : m.out_features] = m.bias
                pad[i, : m.out_features] = 0.0
        self.register_buffer("pad", pad, persistent=False)

    def forward(self, x):
        return torch.einsum("bnc,nkc->bnk", x, self.weight) + self.bias + self.pad

    def forward_one(self, x, i):
        """Layer i alone on B x C: B x K_i."""
        k = self.sizes[i]
        return F.linear(x, self.weight[i, :k], self.bias[i, :k])


def pool_groups(h, groups):
    """B x (G C) x H x W -> B x G x C (global average pooling per branch)."""
    return torch.flatten(F.adaptive_avg_pool2d(h, 1), 1).view(len(h), groups, -1)


def gather_groups(h, index, groups):
    """B x (G C) x H x W -> B x (len(index) C) x H x W: the branches `index`, in that order."""
    B, GC, H, W = h.shape
    if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous():
        y = h.permute(0, 2, 3, 1).reshape(B, H, W, groups, GC // groups).index_select(3, index)
        return y.reshape(B, H, W, -1).permute(0, 3, 1, 2)
    return h.reshape(B, groups, GC // groups, H, W).index_select(1, index).reshape(B, -1, H, W)


class HierNet(nn.Module):
    """HierNet with the branches of each tree level run as one computation.

    The tree is cut at the split points into segments: segment l (l = 1..D) holds the blocks
    from split l-1 to split l (the last to the backbone's end) of every path alive at level l,
    P_l: the level-l nodes, and the leaf groups of upper levels continued (their edge is cut
    into the same segments, which changes nothing: a composition of the same blocks). Segment l
    is one GroupedStage over P_l (groups = |P_l|), reading the trunk at l = 1 and its parents'
    features (gathered) below. The inner nodes of level l classify with one GroupedStage of
    extra blocks and one StackedLinear; every leaf group of P_D with one StackedLinear (padded
    to the largest group, padding at -inf). Same weights and function as the per-branch
    `PerBranchHierNet` it is built from (tests/test_hiernet.py checks logits and gradients).

    forward(x): log p over the classes in tree order (slow). route(x): fast evaluation
    (Algorithm 1), `fast_mode` "sorted" (only the routed branch per image; one host sync per
    level) or "all" (every branch batched, then per-image selection; no host sync)."""

    def __init__(self, reference, segment_lengths, fast_mode="sorted"):
        super().__init__()
        root, depth = reference.root, len(segment_lengths)
        self.depth, self.fast_mode = depth, fast_mode
        self.register_buffer("order", reference.order.clone(), persistent=False)
        self.register_buffer("rank", reference.rank.clone(), persistent=False)
        self.trunk = copy.deepcopy(root.edge)
        # A path: its node, parent path index, blocks of the current segment, blocks left, decisions so far.
        level = [{"node": root, "parent": 0, "blocks": [], "rest": [], "decisions": []}]
        self.paths, route_tables = [level], []
        for l in range(depth):
            inner = [i for i, p in enumerate(level) if not p["node"].is_leaf_group]
            nxt, child_path, cont = [], [], [-1] * len(level)
            for i, p in enumerate(level):
                if i in inner:  # one path per child, its edge's first segment
                    node_i = inner.index(i)
                    children = [
                        (child, list(child.edge), p["decisions"] + [(l, node_i, j)])
                        for j, child in enumerate(p["node"].branches)
                    ]
                else:  # a leaf group's edge continues into this segment
                    children = [(p["node"], p["rest"], p["decisions"])]
                first = len(nxt)
                for node, blocks, decisions in children:
                    n = segment_lengths[l]
                    nxt.append(
                        {"node": node, "parent": i, "blocks": blocks[:n], "rest": blocks[n:], "decisions": decisions}
                    )
                if i in inner:
                    child_path.append(list(range(first, len(nxt))))
                else:
                    cont[i] = first
            nodes = [level[i]["node"] for i in inner]
            if l == 0 and (len(nodes) != 1 or root.is_leaf_group):
                raise ValueError("the tree's top level must list groups")
            extra = GroupedStage([list(n.extra) for n in nodes])
            self.register_module(f"node_extra{l}", extra)
            self.register_module(f"node_fc{l}", StackedLinear([n.fc for n in nodes]))
            segment = GroupedStage([p["blocks"] for p in nxt], shared_input=l == 0)
            self.register_module(f"segment{l + 1}", segment)
            width = max(len(c) for c in child_path)
            self.register_buffer(
                f"child_path{l}",
                torch.tensor([c + [0] * (width - len(c)) for c in child_path], dtype=torch.long),
                persistent=False,
            )
            node_of = [-1] * len(level)
            for k, i in enumerate(inner):
                node_of[i] = k
            self.register_buffer(f"path_node{l}", torch.tensor(node_of, dtype=torch.long), persistent=False)
            route_tables.append((node_of, cont))
            self.register_buffer(f"cont{l}", torch.tensor(cont, dtype=torch.long), persistent=False)
            self.register_buffer(f"inner_paths{l}", torch.tensor(inner, dtype=torch.long), persistent=False)
            self.register_buffer(
                f"parents{l + 1}", torch.tensor([p["parent"] for p in nxt], dtype=torch.long), persistent=False
            )
            level = nxt
            self.paths.append(level)
        if any(p["rest"] or not p["node"].is_leaf_group for p in level):
            raise ValueError("segment lengths do not match the tree's edges")
        self.leaf_pre = copy.deepcopy(level[0]["node"].extra)  # the backbone head's activation before pooling
        self.leaf_fc = StackedLinear([p["node"].fc for p in level])
        sizes = [len(p["node"].classes) for p in level]
        if [c for p in level for c in p["node"].classes] != reference.root.classes:
            raise ValueError("leaf groups are not in tree order")
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        self.register_buffer("leaf_offset", torch.tensor(offsets, dtype=torch.long), persistent=False)
        # Per tree position: its entry in the flattened leaf log-probs, and in each level's
        # flattened node log-probs with one zero column appended (no decision at that level).
        k_leaf = self.leaf_fc.weight.shape[1]
        leaf_index, node_index = [], [[] for _ in range(depth)]
        for p_i, p in enumerate(level):
            for k in range(sizes[p_i]):
                leaf_index.append(p_i * k_leaf + k)
                taken = {l: (n, j) for l, n, j in p["decisions"]}
                for l in range(depth):
                    fc = getattr(self, f"node_fc{l}")
                    n_nodes, width = fc.weight.shape[:2]
                    n, j = taken.get(l, (n_nodes, 0))
                    node_index[l].append(n * width + j)
        self.register_buffer("leaf_index", torch.tensor(leaf_index, dtype=torch.long), persistent=False)
        for l in range(depth):
            self.register_buffer(f"node_index{l}", torch.tensor(node_index[l], dtype=torch.long), persistent=False)
        # Host-side copies of the routing tables for the sorted fast path.
        self.route_tables = [(node_of, cont) for node_of, cont in route_tables]
        self.leaf_offsets = offsets
        # Level l's segment reads its parents' features in order, one each: no gather needed.
        self.read_in_order = [
            [p["parent"] for p in self.paths[l + 1]] == list(range(len(self.paths[l]))) for l in range(depth)
        ]
        self.paths = [[{k: v for k, v in p.items() if k in ("parent", "decisions")} for p in lv] for lv in self.paths]

    def level_outputs(self, x):
        """Every branch on the whole batch: ([B x N_l x M_l node logits per level], B x L x K leaf logits)."""
        h = self.trunk(x)
        node_logits, feats, n_paths = [], h, 1
        for l in range(self.depth):
            fc = getattr(self, f"node_fc{l}")
            n_nodes = fc.weight.shape[0]
            node_in = feats
            if l > 0 and n_nodes != n_paths:
                node_in = gather_groups(feats, getattr(self, f"inner_paths{l}"), n_paths)
            node_logits.append(fc(pool_groups(getattr(self, f"node_extra{l}")(node_in), n_nodes)))
            parents = getattr(self, f"parents{l + 1}")
            seg_in = feats
            if l > 0 and not self.read_in_order[l]:
                seg_in = gather_groups(feats, parents, n_paths)
            feats, n_paths = getattr(self, f"segment{l + 1}")(seg_in), len(parents)
        leaf_logits = self.leaf_fc(pool_groups(self.leaf_pre(feats), n_paths))
        return node_logits, leaf_logits

    def log_probs(self, node_logits, leaf_logits):
        """log p of every class (tree order): the leaf's log-softmax plus its ancestors' decisions."""
        total = F.log_softmax(leaf_logits.float(), 2).flatten(1).index_select(1, self.leaf_index)
        for l, logits in enumerate(node_logits):
            lp = F.log_softmax(logits.float(), 2).flatten(1)
            lp = torch.cat([lp, lp.new_zeros(len(lp), 1)], 1)
            total = total + lp.index_select(1, getattr(self, f"node_index{l}"))
        return total

    def forward(self, x):
        return self.log_probs(*self.level_outputs(x))

    def outputs(self, x):
        """(log p in tree order, the super-class node's logits)."""
        node_logits, leaf_logits = self.level_outputs(x)
        return self.log_probs(node_logits, leaf_logits), node_logits[0][:, 0]

    def route(self, x):
        """Fast evaluation: the predicted tree position per image."""
        return self.route_sorted(x) if self.fast_mode == "sorted" else self.route_all(x)

    def route_all(self, x):
        """Algorithm 1's decisions read from every branch's outputs (no host sync)."""
        return self.route_from(*self.level_outputs(x))

    def outputs_and_route(self, x):
        """(log p in tree order, super-class logits, fast prediction): slow, super-class and fast
        from one pass; the fast prediction is route_all's (route_sorted's gives the same
        positions, tests/test_hiernet.py)."""
        node_logits, leaf_logits = self.level_outputs(x)
        route = self.route_from(node_logits, leaf_logits)
        return self.log_probs(node_logits, leaf_logits), node_logits[0][:, 0], route

    def route_from(self, node_logits, leaf_logits):
        """Algorithm 1's decisions (TreeNode.route), level by level, read from every branch's logits: a
        batched form, equal image by image (test_fast_evaluation_equals_algorithm_1_image_by_image)."""
        rows = torch.arange(len(leaf_logits), device=leaf_logits.device)
        path = torch.zeros_like(rows)
        for l in range(self.depth):
            node = getattr(self, f"path_node{l}")[path]
            safe = node.clamp(min=0)
            choice = node_logits[l][rows, safe].argmax(1)
            path = torch.where(
                node >= 0, getattr(self, f"child_path{l}")[safe, choice], getattr(self, f"cont{l}")[path]
            )
        return self.leaf_offset[path] + leaf_logits[rows, path].argmax(1)

    def route_sorted(self, x):
        """Algorithm 1 (TreeNode.route) in batched form, equal image by image (tests/test_hiernet.py::
        test_fast_evaluation_equals_algorithm_1_image_by_image), computing only the routed branch of each
        image: per level, the images are sorted by their path and each path's blocks run on its own images
        (one host sync per level, for the counts). Evaluation mode only (BatchNorm's running statistics)."""
        h = self.trunk(x)
        logits = self.node_fc0(pool_groups(self.node_extra0(h), 1))[:, 0]
        nxt = self.child_path0[0][logits.argmax(1)]
        image = torch.arange(len(x), device=x.device)
        for l in range(1, self.depth + 1):
            by_path = torch.argsort(nxt, stable=True)
            counts = torch.bincount(nxt, minlength=len(self.paths[l])).tolist()  # the host sync of this level
            h, image = h[by_path], image[by_path]
            segment, outs, decisions, start = getattr(self, f"segment{l}"), [], [], 0
            for p, count in enumerate(counts):
                if not count:
                    continue
                hp = segment.forward_one(h[start : start + count], p)
                start += count
                if l == self.depth:
                    pooled = torch.flatten(F.adaptive_avg_pool2d(self.leaf_pre(hp), 1), 1)
                    decisions.append(self.leaf_fc.forward_one(pooled, p).argmax(1) + self.leaf_offsets[p])
                    continue
                path_node, cont = self.route_tables[l]
                node = path_node[p]
                if node >= 0:
                    extra = getattr(self, f"node_extra{l}").forward_one(hp, node)
                    pooled = torch.flatten(F.adaptive_avg_pool2d(extra, 1), 1)
                    choice = getattr(self, f"node_fc{l}").forward_one(pooled, node).argmax(1)
                    decisions.append(getattr(self, f"child_path{l}")[node][choice])
                else:
                    decisions.append(torch.full((count,), cont[p], dtype=torch.long, device=x.device))
                outs.append(hp)
            nxt = torch.cat(decisions)
            if l < self.depth:
                h = torch.cat(outs)
        out = torch.empty_like(nxt)
        out[image] = nxt
        return out


def build_hiernet(backbone, tree, splits, extras, leaf_init="backbone", fast_mode="sorted"):
    """The batched HierNet, built from the per-branch one (same weights, same function); its
    `tree_params` counts the per-branch tree's parameters (the batched form adds only the leaf FCs'
    zero padding)."""
    reference = build_per_branch(backbone, tree, splits, extras, leaf_init)
    depth = grouping.tree_depth(tree)
    bounds = list(splits[:depth]) + [len(backbone.blocks)]
    model = HierNet(reference, [b - a for a, b in itertools.pairwise(bounds)], fast_mode=fast_mode)
    model.tree_params = common.count_params(reference)
    return model


def refuse_per_branch_checkpoint(path):
    """Checkpoints of the earlier per-branch HierNet (keys root.*) do not fit the batched model."""
    if path.is_file() and any(k.startswith("root.") for k in common.load_checkpoint(path)["model"]):
        common.fail(
            f"{path} holds the per-branch HierNet of an earlier version, which the batched model cannot "
            "resume; start a new run (reuse its backbone with --backbone-ckpt and its tree with --groups)"
        )


# --------------------------------------------------------------------------------------------------
# The backbone (He et al.'s CIFAR ResNet, common.CifarResNet, with the authors' options); the test set's
# halves; exact fp32
# --------------------------------------------------------------------------------------------------


def make_backbone(args, num_classes, in_channels=3):
    """`CifarResNet(--n, --elu)` with the authors' details asked for: the ELU before pooling
    (`--elu --elu-head`) and option-B shortcuts (`--shortcut B`)."""
    backbone = common.CifarResNet(args.n, num_classes, elu=args.elu, in_channels=in_channels)
    if args.elu and args.elu_head:
        backbone.head.pre = nn.ELU()
    if args.shortcut == "B":
        for block in backbone.blocks:
            if isinstance(block.shortcut, common.ShortcutA):
                cin, cout = block.conv1.in_channels, block.conv1.out_channels
                block.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, block.shortcut.stride, bias=False), nn.BatchNorm2d(cout)
                )
        common.init_weights(backbone.stages)
    return backbone


def test_halves(args, labels):
    """(validation indices, test indices) of the test set: the authors' halves (checked: 50 +
    50 per class with these labels, which catches a test set in another order) or seeded, half of
    every class each."""
    labels = np.asarray(labels)
    if args.test_halves == "seeded":
        counts = np.bincount(labels)
        return common.stratified_split(labels, int(counts[counts > 0].min()) // 2, args.seed)
    mask = authors_test_mask()
    if len(labels) != len(mask) or any((np.bincount(labels[m], minlength=100) != 50).any() for m in (~mask, mask)):
        common.fail(
            "--test-halves authors: the authors' halves do not give 50 + 50 images per class with this "
            "test set; it is not CIFAR-100's in the official order (delete --data-dir's cifar-100-python "
            "and let torchvision download it again), or pass --test-halves seeded"
        )
    return np.flatnonzero(~mask), np.flatnonzero(mask)


@contextlib.contextmanager
def exact_fp32():
    """fp32 without TF32 on CUDA: the CPM and every reported accuracy (bf16 logits shift the
    proximities by up to 0.007, the size of p_min)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def backbone_cpm(backbone, val_loader, num_classes, device):
    """The backbone's CPM on the validation half (section 4), in fp32 without TF32 (`exact_fp32`)."""
    with exact_fp32():
        return grouping.confusion_probability_matrix(backbone, val_loader, num_classes, device=device, dtype="fp32")


def predict(forward, loader, device, dtype="fp32"):
    """common.predict, in fp32 without TF32 (`exact_fp32`) unless another dtype is asked for."""
    with exact_fp32() if dtype == "fp32" else contextlib.nullcontext():
        return common.predict(forward, loader, device=device, dtype=dtype)


def split_test_set(args, data):
    """The validation and test halves of the test set (`test_halves`), reported in one line."""
    val_idx, test_idx = test_halves(args, data.test.labels.numpy())
    if len(val_idx) == 0:
        common.fail(
            f"the test set ({len(data.test)} images) has a class with fewer than 2 images; "
            "it cannot be halved into validation and test (raise --test-size)"
        )
    val, test = data.test.subset(val_idx), data.test.subset(test_idx)
    print(
        f"[hiernet] {data.name}: {len(data.train)} train, {len(val)} validation, {len(test)} test, "
        f"{data.num_classes} classes, {data.train.images.shape[-1]}px, {args.test_halves} test halves",
        flush=True,
    )
    return val, test


def make_loader(args, data, device, split, labels=None, train=False, seed=0):
    """The GPU loader of a split; training: flip and translation by 0.125 of the side, grey (128) border."""
    size = data.train.images.shape[-1]
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
        max_batches=2 if args.dry_run else None,
        channels_last=device.type == "cuda",
    )  # channels_last is slow on the CPU


# --------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------


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


def make_schedule(args, steps_per_epoch, iterations, warmup=True):
    """(epochs, lr_at): the paper's iteration schedule scaled to the run length; without
    warm-up the first segment runs at the peak lr."""
    nominal, boundaries = SCHEDULES[args.schedule]
    if args.epochs:
        epochs, total = args.epochs, args.epochs * steps_per_epoch
    else:
        total = iterations or nominal
        epochs = math.ceil(total / steps_per_epoch)
    scale = total / nominal
    values = [args.lr / 10 if warmup else args.lr, args.lr, args.lr / 10, args.lr / 100]
    return epochs, common.piecewise_lr([max(1, round(b * scale)) for b in boundaries], values)


def stage_schedule(args, steps_per_epoch, stage):
    """(epochs, lr_at) of a stage. The backbone warms up only for n = 18 unless
    --backbone-warmup always (section 5.4: He et al.'s ResNets; "all HierNets use a similar
    schedule to the n = 18 ResNet"); HierNet and the control run the HierNet schedule."""
    if stage == "backbone":
        warmup = args.backbone_warmup == "always" or args.n == 18
        return make_schedule(args, steps_per_epoch, args.backbone_iterations or args.iterations, warmup)
    return make_schedule(args, steps_per_epoch, args.iterations)


def evaluate_hiernet(model, loader, group_of, *, device, dtype="fp32"):
    """Slow, fast and super-class predictions in dataset class indices, plus log p (dataset
    class order) and the labels; in exact fp32 unless dtype says otherwise (the per-epoch
    validation curve runs in the training dtype). One pass when fast_mode is "all"."""
    if model.fast_mode == "all":
        (log_p, super_logits, routed), labels = predict(model.outputs_and_route, loader, device, dtype)
    else:
        (log_p, super_logits), labels = predict(model.outputs, loader, device, dtype)
        routed, _ = predict(model.route, loader, device, dtype)
    order = model.order.cpu()
    return {
        "log_p": log_p[:, model.rank.cpu()],  # columns back in dataset order
        "labels": labels,
        "slow": order[log_p.argmax(1)],
        "fast": order[routed.round().long()],
        "super": super_logits.argmax(1),
        "super_true": torch.as_tensor(group_of)[labels],
    }


def validation_accuracies(model, val_loader, group_of, device, dtype):
    """Slow, fast and super-class accuracy on the validation half (the curve: --dtype; the final: fp32)."""
    out = evaluate_hiernet(model, val_loader, group_of, device=device, dtype=dtype)
    return {
        "val_slow_acc": percent(out["slow"] == out["labels"]),
        "val_fast_acc": percent(out["fast"] == out["labels"]),
        "val_super_acc": percent(out["super"] == out["super_true"]),
    }


def percent(mask):
    return 100.0 * mask.float().mean().item() if len(mask) else float("nan")


def train_backbone(args, data, train_loader, val_loader, run_dir, device):
    backbone = common.to_device_model(make_backbone(args, data.num_classes, data.train.images.shape[1]), device)
    if args.backbone_ckpt:  # check_args found the file; a fit checkpoint holds the weights under "model"
        state = common.load_checkpoint(args.backbone_ckpt, device)
        common.load_weights(backbone, state.get("model", state), f"--backbone-ckpt {args.backbone_ckpt}")
        return backbone.eval(), []
    return backbone, fit_plain_stage(args, backbone, "backbone", train_loader, val_loader, run_dir, device)


def fit_plain_stage(args, model, stage, train_loader, val_loader, run_dir, device):
    """`fit_stage` for a plain ResNet (the backbone, the control): cross-entropy, validation accuracy as the curve."""

    def evaluate(epoch):
        logits, labels = common.predict(model, val_loader, device=device, dtype=args.dtype)
        return {"val_acc": common.accuracy(logits, labels)}

    return fit_stage(args, model, stage, common.cross_entropy_loss, train_loader, evaluate, run_dir, device)


def fit_stage(args, model, stage, loss_fn, train_loader, evaluate, run_dir, device):
    """Train a stage on its schedule with common.fit (checkpointed, resumable; the model ends in
    eval mode) and return its history. evaluate(epoch) is the validation curve, in the training dtype: watched,
    never chosen on."""
    optimizer = make_optimizer(args, model)
    epochs, lr_at = stage_schedule(args, len(train_loader), stage)
    gpu = {"device": device, "dtype": args.dtype, "cuda_graph": args.cuda_graph}
    step = common.make_train_step(model, loss_fn, optimizer, compile=args.compile, **gpu)
    per_epoch = {"evaluate": evaluate, "log_path": run_dir / "metrics.jsonl", "stage": stage}  # a line each epoch
    return common.fit(run_dir / stage, model, optimizer, step, train_loader, epochs=epochs, lr_at=lr_at, **per_epoch)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    run_dir, device = common.setup(args, "hiernet")
    data = common.load_data(args)
    val, test = split_test_set(args, data)  # validation half (CPM, grouping, the curve) and test half (once)
    loader = functools.partial(make_loader, args, data, device)
    val_loader, test_loader = loader(val), loader(test)

    # 1. Backbone; with --control, a copy of it trained on for HierNet's iterations on HierNet's schedule, with
    # HierNet's image order and augmentation (seed 1), to separate the tree's gain from training longer.
    backbone, backbone_history = train_backbone(args, data, loader(data.train, train=True), val_loader, run_dir, device)
    control, control_history = None, []
    if args.control:
        control, control_loader = copy.deepcopy(backbone), loader(data.train, train=True, seed=1)
        control_history = fit_plain_stage(args, control, "control", control_loader, val_loader, run_dir, device)

    # 2-3. CPM on the validation half and grouping into a tree (section 4, grouping.py); tree.json / .txt / .dot.
    cpm = functools.partial(backbone_cpm, backbone, val_loader, data.num_classes, device)  # only if the tree needs it
    tree, tree_settings = grouping.run_tree(args, data, run_dir, cpm)
    grouping.save_run_tree(run_dir, tree, tree_settings, data.class_names)
    top_groups, group_of = grouping.top_level_groups(tree, data.num_classes)

    # 4. HierNet from the backbone's weights (section 5.4; --no-transfer: from a fresh backbone).
    source = make_backbone(args, data.num_classes, data.train.images.shape[1]) if args.no_transfer else backbone
    model = build_hiernet(source, tree, args.split, args.extra_blocks, args.leaf_init, fast_mode=args.fast_mode)
    model = common.to_device_model(model, device)
    print(
        f"[hiernet] backbone {common.count_params(backbone) / 1e6:.3f}M parameters, HierNet "
        f"{model.tree_params / 1e6:.3f}M, {len(tree)} groups",
        flush=True,
    )

    # 5. End to end on tree-ordered labels: NLL of the product of the nodes' softmaxes (section 3.2).
    refuse_per_branch_checkpoint(run_dir / "hiernet" / "checkpoint.pt")
    train_loader = loader(data.train, labels=model.rank.cpu()[data.train.labels], train=True, seed=1)
    val_accuracies = functools.partial(validation_accuracies, model, val_loader, group_of, device)
    hiernet_history = fit_stage(
        args, model, "hiernet", hiernet_loss, train_loader, lambda epoch: val_accuracies(args.dtype), run_dir, device
    )

    # 6. The test half, once, in fp32 (no TF32): every number into metrics.json, then the run's small tables.
    results = evaluate_hiernet(model, test_loader, group_of, device=device)
    results["backbone_logits"] = predict(backbone, test_loader, device)[0]
    results["control_logits"] = None if control is None else predict(control, test_loader, device)[0]
    histories = {"backbone": backbone_history, "hiernet": hiernet_history, "control": control_history}
    metrics = final_metrics(args, data, tree, tree_settings, top_groups, group_of, results, histories)
    metrics.update(val_accuracies("fp32"))  # the final validation figures, exact like the test's
    metrics.update(epoch_seconds(histories))
    metrics.update(backbone_params=common.count_params(backbone), hiernet_params=model.tree_params)
    metrics.update(measure_inference(args, backbone, model, next(iter(test_loader))[0], device))
    common.write_json(run_dir / "metrics.json", metrics)
    report(run_dir, data.class_names, top_groups, results, metrics)
    return metrics


# --------------------------------------------------------------------------------------------------
# Reporting: the run's numbers and per-group table, hierarchical metrics, images/s (the paper's
# Table 1 / 2 beside ours: python tools/results_table.py --run RUN_DIR)
# --------------------------------------------------------------------------------------------------


def final_metrics(args, data, tree, tree_settings, top_groups, group_of, results, histories):
    """The run's settings and its test-half numbers (`results`: evaluate_hiernet's, with the backbone's and the
    control's logits): accuracies of backbone, slow, fast, the super-class node (and the control), per level of
    the dataset's hierarchy, and the hierarchical metrics."""
    labels, backbone_logits = results["labels"], results["backbone_logits"]
    backbone_pred = backbone_logits.argmax(1)
    metrics = {
        "dataset": data.name,
        "n": args.n,
        "elu": args.elu,
        "elu_head": args.elu and args.elu_head,
        "shortcut": args.shortcut,
        "transfer": not args.no_transfer,
        "leaf_init": args.leaf_init,
        "test_halves": args.test_halves,
        "split": args.split,
        "extra_blocks": args.extra_blocks,
        "tree_source": tree_settings["source"],
        "depth": grouping.tree_depth(tree),
        "n_groups": len(tree),
        "group_sizes": [len(g) for g in top_groups],
        "test_images": len(labels),
        "backbone_acc": percent(backbone_pred == labels),
        "slow_acc": percent(results["slow"] == labels),
        "fast_acc": percent(results["fast"] == labels),
        "superclass_acc": percent(results["super"] == results["super_true"]),
        "backbone_superclass_acc": percent(torch.as_tensor(group_of)[backbone_pred] == results["super_true"]),
        "fast_equals_slow": percent(results["fast"] == results["slow"]),
    }
    if results["control_logits"] is not None:
        metrics["control_acc"] = percent(results["control_logits"].argmax(1) == labels)
        for stage in ("control", "hiernet"):
            metrics[f"{stage}_iterations"] = histories[stage][-1]["step"] if histories[stage] else 0
    if data.hierarchy.n_levels > 1:
        metrics["level_acc_backbone"] = common.level_accuracies(backbone_logits, labels, data.hierarchy)
        metrics["level_acc_slow"] = common.level_accuracies(results["log_p"], labels, data.hierarchy)
    metrics["hierarchical"] = hierarchical_report(data, top_groups, group_of, results)
    return metrics


def epoch_seconds(histories):
    """The median seconds per epoch of each stage (the first epoch, with graph capture, left out) and its epochs."""
    metrics = {}
    for name, history in histories.items():
        seconds = [r["seconds"] for r in history[1:] or history]  # the first epoch includes graph capture
        if seconds:
            metrics[f"{name}_epoch_seconds"] = float(np.median(seconds))
            metrics[f"{name}_epochs"] = len(history)
    return metrics


def report(run_dir, names, top_groups, results, metrics):
    """Per-group accuracies (per_group.json, per_group.txt, printed) and the one-line summary."""
    labels, group = results["labels"], results["super_true"]  # each image's true top-level group
    correct = {
        "backbone": results["backbone_logits"].argmax(1) == labels,
        "slow": results["slow"] == labels,
        "fast": results["fast"] == labels,
    }

    def row(g, classes):
        mask = group == g
        return {
            "group": g + 1,
            "classes": classes,
            "names": [names[c] for c in classes],
            "images": int(mask.sum()),
            **{f"{form}_acc": percent(right[mask]) for form, right in correct.items()},
            "routed_acc": percent((results["super"] == g)[mask]),
        }

    per_group = [row(g, classes) for g, classes in enumerate(top_groups)]
    lines = [f"{'group':>6} {'classes':>7} {'images':>6} {'backbone':>8} {'slow':>6} {'fast':>6} {'routed':>6}  names"]
    lines += [
        f"{r['group']:>6} {len(r['classes']):>7} {r['images']:>6} {r['backbone_acc']:>8.2f} {r['slow_acc']:>6.2f} "
        f"{r['fast_acc']:>6.2f} {r['routed_acc']:>6.2f}  {', '.join(r['names'])}"
        for r in per_group
    ]
    common.write_json(run_dir / "per_group.json", per_group)
    common.write_text(run_dir / "per_group.txt", "\n".join(lines) + "\n")
    print("\n".join(lines))
    forms = ("backbone", "slow", "fast")
    accuracies = "  ".join(f"{form} {metrics[f'{form}_acc']:.2f}" for form in forms)
    accuracies += f"  super-class {metrics['superclass_acc']:.2f}"
    speeds = " ".join(f"{form} {metrics[f'{form}_images_per_s']:.0f}" for form in forms)
    control = f" | control (backbone trained as long) {metrics['control_acc']:.2f}" if "control_acc" in metrics else ""
    print(f"[hiernet] test: {accuracies} | images/s {speeds}{control} | {run_dir}", flush=True)


def hierarchical_report(data, top_groups, group_of, results):
    """common.hierarchical_metrics of backbone, slow and fast under the found top-level groups ("groups"; the
    super-class node's decision is slow's and fast's group prediction) and the dataset's coarse levels if any
    ("dataset"). Fast's scores: slow's log p with the fast class moved to the top (docs/hiernet.md)."""
    groups = common.Hierarchy(
        ["group", "fine"],
        [[f"group{g + 1}" for g in range(len(top_groups))], list(data.class_names)],
        [np.asarray(group_of), np.arange(data.num_classes)],
    )
    labels, log_p, routed = results["labels"], results["log_p"], results["super"]
    fast_scores = log_p.clone()
    fast_scores[torch.arange(len(log_p)), results["fast"]] = log_p.max(1).values + 1.0
    forms = {"backbone": (results["backbone_logits"], None), "slow": (log_p, routed), "fast": (fast_scores, routed)}
    report = {"groups": {}}
    for name, (scores, group_pred) in forms.items():
        level_preds = None if group_pred is None else {"group": group_pred.numpy()}
        report["groups"][name] = common.hierarchical_metrics(scores, labels, groups, level_preds=level_preds)
    if data.hierarchy.n_levels > 1:
        report["dataset"] = {
            name: common.hierarchical_metrics(scores, labels, data.hierarchy) for name, (scores, _) in forms.items()
        }
    return report


def measure_inference(args, backbone, model, x, device):
    """Images/s at the evaluation batch and latency at batch 1 of the backbone, slow and fast
    (both fast forms: only the routed branch per image, and every branch then select)."""
    timing = {"iters": 20, "warmup": 5}
    if device.type != "cuda":  # a rough CPU figure only; keeps CPU runs and tests short
        x, timing = x[:32], {"iters": 1, "warmup": 1}
    forms = {
        "backbone": backbone,
        "slow": model,
        "fast": model.route,
        "fast_sorted": model.route_sorted,
        "fast_all": model.route_all,
    }
    out = {"throughput_batch": len(x), "fast_mode": model.fast_mode}
    for name, forward in forms.items():
        out[f"{name}_images_per_s"] = common.measure_throughput(forward, x, device=device, dtype=args.dtype, **timing)
        per_s = common.measure_throughput(forward, x[:1], device=device, dtype=args.dtype, **timing)
        out[f"{name}_latency_ms_batch1"] = 1000.0 / per_s
    return out


# --------------------------------------------------------------------------------------------------
# Data: the authors' CIFAR-100 test half (10000 bits), decoded when called
# --------------------------------------------------------------------------------------------------


# The HierNet authors' validation / test halves of the CIFAR-100 test set (their public code,
# github.com/levtempfli/HierNet, ds_split_cifar100.json: ids test_NNNNN = official test index NNNNN,
# 50 + 50 images per class): bit i (numpy packbits order) is 1 when official test image i is in
# their test half, 0 when in their validation half; 10000 bits, base64.
AUTHORS_TEST_HALF_CIFAR100 = (
    "cjfR8zozObvPYTrWCdcYuMGuuvKSxIazV/GSwqpRIQys3bHTVC5BgRy/U2vrtuX3x3Tvju3lYVhV/MHkNh6AzhFWmnTD3m7KxWV/"
    "sqF6S+Y3jhort15n7Sc4odXG50lhUvB3eblYYmD8myV95QQdNnEMU2EkVdACgktvFXCzwL7AmH6Pcxa/p03HRg7ac2lQBQ1rUoJ8"
    "a91m0u9fzITyOd2qrhP6O6hQQgtQsA8v/zNMZ50PRY7xl8+pGcCFW5YEEcqGVLRDBSgWKSqPudUMqwzlgzc1FtLmnpWyI3AeDI6v"
    "omt/wSSLd4TMi0PWv/kYjG/klQ6UbX2hJu7nhiD8gi5iYrnSTbgejppTIjyn3jR12EpWWaEX+VwHxlbVZhXJzvrSKho1w5t/7yIA"
    "fNHlGxIW+WyZ3sjgPR8VfbUS5SFLiNBfpyOcGEeX5EMh2Fls7WwmRWIdaG5VTTgB7TDjwGfEfc+qJPyVHhK+xdbjES++HEjMZax8"
    "I6s7vkjKMeyTVGvGfsj/nGEVkb6sVyL7USRp24mR8nZWjZc3RbQPgagtIHMP3Eaq5RQ0GbJvC4CMWYUKqWc0GwXCfxya8xI/3auG"
    "KoXP+YLh5Rfa03okjo/lBAG+dxkgD6XVhQ5tRgQeUueneKqEKOycm6SGMfY5EuGCKrrFUqLfxEJjKfqBpvUtw2YF2rdYpaRJAVhr"
    "OuF9c+zi6zQui6H99aXgcMvWgtDKx4nc1VRZLnCbWdyFlRtjSkG5S4KukkDlaBRcT07VonkPnNWghuT0SbZV4CJzeFILlGk+1rsj"
    "Vu/FD8FSxYt2sz5l1u18WPN5WQLpYbDF+GVslOYm121rzj1677WxTAdH4kMwoe8H6Qc/hysaez8UaTvxk2DjT20zGgLxA1Fmp0a9"
    "Q10KESH6K3RZxYdXwpE5FtaMMtHob/ZaVGovtBi2LgmZEahPuDxmgxH9PT3RPpRsz2UlGWYqkwfZvuXg9SeLSrpNqhyj1gj6hMR6"
    "bRrzELpCYZKZF2BRA2fwmWCAc/bGRwW+RSDKQlo2e2z37mD9ft2Nz9tCKfV205u9ipll38Ey4qLPy5kjY0tp+XEH+YqW5w39F6rH"
    "up/kWsds6u6iKrds8/6fysMSYVik7HZQnw+CvzHXRB6+bQbmI7R+hQGH1NajFZKLpZbPqJAfBiCwvrYFgfZGiYYzzRgW5ZPB5exR"
    "/fB/N0zftoey2T7H+nLJ7EkiM9DV/SsyGPwckBV2Hi/YcTvswnJeINX+7TFsaJhu60lOhsjiANVrRi6x/EaNjAAyDDRJhH1Xtebl"
    "/lQZUYwxIYn+bFK8ITDTbIm101uLOkXibLAVZA5Lr3zy8oE2I8l+QiqZW0aQIh5VtVqifdD4/+UCKjTdNJVZDg2T7WrhFkpHO9xV"
    "9KAchP7lGB+zcSDrhv7ezt6QnFeu+exarpK07Mkh8ZsDaMR/OFx0zymUL/FDj97pznNtp1CvJ4B42AMq00gjI98kORU8rUsg9Mg7"
    "6GGLGxcX8FQ9HvWC5ikeY5D356DLbE6AM7KAxjbr2NVc23+wmbASrrpjJSzIp1uzzv8blCZ0Gg5rCvgSwO6jRFL8RYsFxSVctFdc"
    "tSTTBeD387EVDq5oF8ARbSj78W1govaoTaLG6tOCtU+n452Ia7pRBploOD4CCJ89qDs="
)


def authors_test_mask():
    """The authors' CIFAR-100 test half as a boolean mask over the official test indices."""
    bits = np.unpackbits(np.frombuffer(base64.b64decode(AUTHORS_TEST_HALF_CIFAR100), dtype=np.uint8))
    return bits[:10000].astype(bool)


if __name__ == "__main__":
    main()
