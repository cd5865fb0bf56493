import argparse
import copy
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import grouping
import hiernet

# 10 classes; a depth-2 tree: group 1 has two subgroups, group 2 is a leaf group.
TREE = [[[3, 7], [0, 5, 9]], [1, 2, 4, 6, 8]]
# Depth 1, unequal group sizes.
FLAT_TREE = [[3, 7], [0, 5, 9], [1, 2, 4, 6, 8]]
SHARED_SPLIT = Path("/work/shared/data/hiernet_ds_split_cifar100.json")


def random_backbone(n=1, num_classes=10, seed=0, elu=False, shortcut="A"):
    """A CifarResNet with random BatchNorm statistics and affine parameters (as after training)."""
    torch.manual_seed(seed)
    args = argparse.Namespace(n=n, elu=elu, elu_head=True, shortcut=shortcut)
    backbone = hiernet.make_backbone(args, num_classes)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    backbone.head.fc.weight.data.mul_(5)
    return backbone.eval()


def make_model(tree=TREE, splits=(1, 2), extras=(1, 1), fc_scale=5.0, **backbone_kwargs):
    """(backbone, per-branch reference, batched HierNet with the same weights)."""
    backbone = random_backbone(**backbone_kwargs)
    reference = hiernet.build_per_branch(backbone, tree, list(splits), list(extras)).eval()
    for m in reference.modules():  # larger random FCs so the node softmaxes are far from uniform
        if isinstance(m, torch.nn.Linear):
            m.weight.data.mul_(fc_scale)
    return backbone, reference, batched_from(reference, tree, splits, len(backbone.blocks))


def batched_from(reference, tree, splits, n_blocks):
    bounds = list(splits[: grouping.tree_depth(tree)]) + [n_blocks]
    return hiernet.HierNet(reference, [b - a for a, b in zip(bounds, bounds[1:])]).eval()


def brute_force_probs(model, x):
    """p(class) as the product of the node softmaxes along each class's path, with loops."""
    probs = {}

    def walk(node, h, p_path):
        h = node.edge(h)
        p_node = torch.softmax(node.classify(h), 1)
        for i in range(p_node.shape[1]):
            if node.is_leaf_group:
                probs[node.classes[i]] = p_path * p_node[:, i]
            else:
                walk(node.branches[i], h, p_path * p_node[:, i])

    walk(model.root, x, torch.ones(len(x)))
    return torch.stack([probs[c] for c in range(len(probs))], 1)


@torch.no_grad()
def test_leaf_probabilities_sum_to_one_and_equal_the_product_of_node_softmaxes():
    _, model, batched = make_model()
    x = torch.randn(6, 3, 16, 16)
    log_p = model(x)
    torch.testing.assert_close(batched(x), log_p, rtol=1e-5, atol=1e-5)
    assert log_p.shape == (6, 10)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(6))
    reference = brute_force_probs(model, x)  # dataset class order
    torch.testing.assert_close(log_p.exp(), reference[:, model.order], rtol=1e-5, atol=1e-7)
    assert model.order.tolist() == grouping.tree_leaves(TREE)
    assert (model.order[model.rank] == torch.arange(10)).all()
    # The training loss is the cross-entropy of that product at the tree-ordered label.
    y = torch.tensor([3, 0, 1, 9, 6, 2])
    loss, _ = hiernet.hiernet_loss(model, x, model.rank[y])
    torch.testing.assert_close(loss, -reference[torch.arange(6), y].log().mean(), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_fast_routing_picks_the_slow_class_when_every_node_is_confident():
    _, model, _ = make_model(fc_scale=200.0)  # near one-hot softmaxes at every node
    x = torch.randn(64, 3, 16, 16)

    def centre(node, h):  # shift each node's biases so that its decisions vary across the batch
        h = node.edge(h)
        node.fc.bias -= node.classify(h).mean(0)
        for branch in node.branches or []:
            centre(branch, h)

    centre(model.root, x)
    slow = model(x).argmax(1)
    seen = []  # batch sizes each top-level branch gets in the fast pass
    hooks = [b.edge.register_forward_hook(lambda m, i, o: seen.append(len(o))) for b in model.root.branches]
    fast = model.route(x)
    for h in hooks:
        h.remove()
    assert (fast == slow).all()
    assert len(set(model.order[fast].tolist())) > 2  # the routing is not trivial
    assert sum(seen) == len(x)  # every image went through exactly one branch
    assert len(seen) == 2


def leaf_group_outputs(node, x):
    """[(classes, pooled features, logits)] of every leaf group of a TreeNode: its root-to-leaf path."""
    h = node.edge(x)
    if node.is_leaf_group:
        pooled = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(node.extra(h), 1), 1)
        return [(node.classes, pooled, node.fc(pooled))]
    return [out for branch in node.branches for out in leaf_group_outputs(branch, h)]


@torch.no_grad()
def test_weight_transfer_reproduces_the_backbone_on_every_path():
    backbone, model, batched = make_model(fc_scale=1.0)
    x = torch.randn(5, 3, 16, 16)
    features, logits = backbone.features(x), backbone(x)
    outputs = leaf_group_outputs(model.root, x)
    assert sorted(c for classes, _, _ in outputs for c in classes) == list(range(10))
    for classes, pooled, leaf_logits in outputs:
        torch.testing.assert_close(pooled, features, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(leaf_logits, logits[:, classes], rtol=1e-5, atol=1e-5)
    # The super-class node's extra block is a copy of the block after the split.
    extra, block = model.root.extra[0], backbone.blocks[1]
    for (k, a), (_, b) in zip(extra.state_dict().items(), block.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    # Copies, not shared modules: training a branch leaves the backbone alone.
    assert all(p.data_ptr() != q.data_ptr() for p in model.parameters() for q in backbone.parameters())
    # The batched model's leaf logits: every path is the backbone too (tree-ordered classes).
    _, leaf_logits = batched.level_outputs(x)
    for p, offset in enumerate(batched.leaf_offsets):
        classes = batched.order[offset : offset + batched.leaf_fc.sizes[p]]
        torch.testing.assert_close(leaf_logits[:, p, : len(classes)], logits[:, classes], rtol=1e-5, atol=1e-5)


def leaf_groups(tree):
    return [tree] if grouping.is_leaf_group(tree) else [g for child in tree for g in leaf_groups(child)]


def centre_biases(model, x):
    """Shift each per-branch node's FC bias so that its decisions vary across the batch."""

    def walk(node, h):
        h = node.edge(h)
        node.fc.bias -= node.classify(h).mean(0)
        for branch in node.branches or []:
            walk(branch, h)

    with torch.no_grad():
        walk(model.root, x)


@pytest.mark.parametrize(
    "tree,splits,extras,kwargs",
    [
        (FLAT_TREE, (1,), (1,), {}),
        (TREE, (1, 2), (1, 1), {}),
        (TREE, (1, 2), (0, 1), {"elu": True, "shortcut": "B"}),
        ([[[3, 7], [0, 5, 9]], [[1, 2], [4, 6, 8]]], (2, 4), (1, 0), {"n": 2, "shortcut": "B"}),
    ],
)
def test_batched_model_gives_the_per_branch_logits_and_gradients(tree, splits, extras, kwargs):
    """Training mode (batch statistics), fp32: the same log p and, parameter by parameter, the
    same gradients as the per-branch reference; the reference's gradients are stacked into a
    batched model of the same tree, which puts them where the batched parameters are."""
    _, reference, batched = make_model(tree, splits, extras, **kwargs)
    n_blocks = 3 * kwargs.get("n", 1)
    reference.train(), batched.train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    loss_ref, _ = hiernet.hiernet_loss(reference, x, reference.rank[y])
    loss, _ = hiernet.hiernet_loss(batched, x, batched.rank[y])
    torch.testing.assert_close(batched(x), reference(x), rtol=1e-5, atol=1e-5)
    loss_ref.backward(), loss.backward()
    grads = copy.deepcopy(reference)
    with torch.no_grad():
        for p, q in zip(grads.parameters(), reference.parameters()):
            p.copy_(q.grad)
    stacked = batched_from(grads, tree, splits, n_blocks)
    expected = dict(stacked.named_parameters())
    for name, p in batched.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-5, msg=name)
    # The padded leaf outputs carry no probability.
    assert bool(batched.leaf_fc.pad.isinf().any()) == (len({len(g) for g in leaf_groups(tree)}) > 1)


def test_gather_groups_picks_whole_branches_in_either_memory_layout():
    """The channels-last form (GPU training's layout) and the contiguous one pick the same branches
    as slicing each branch's channels out by hand."""
    h = torch.randn(2, 4 * 3, 5, 6)  # 4 branches of 3 channels
    index = torch.tensor([2, 0, 3, 3])
    by_hand = torch.cat([h[:, 3 * g : 3 * g + 3] for g in index.tolist()], 1)
    assert torch.equal(hiernet.gather_groups(h, index, 4), by_hand)
    channels_last = h.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()  # the channels-last branch is the one taken
    assert torch.equal(hiernet.gather_groups(channels_last, index, 4), by_hand)


def test_batched_model_in_channels_last_gives_the_per_branch_log_p():
    _, reference, batched = make_model()
    reference.train(), batched.train()
    x = torch.randn(8, 3, 16, 16)
    batched = batched.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        batched(x.contiguous(memory_format=torch.channels_last)), reference(x), rtol=1e-5, atol=1e-5
    )


@torch.no_grad()
@pytest.mark.parametrize("tree,splits", [(FLAT_TREE, (1,)), (TREE, (1, 2))])
def test_fast_evaluation_equals_algorithm_1_image_by_image(tree, splits):
    _, reference, _ = make_model(tree, splits, (1, 1)[: len(splits)], fc_scale=20.0)
    x = torch.randn(48, 3, 16, 16)
    centre_biases(reference, x)
    batched = batched_from(reference, tree, splits, 3)
    one_by_one = torch.cat([reference.route(x[i : i + 1]) for i in range(len(x))])  # Algorithm 1, per image
    assert len(set(one_by_one.tolist())) > 3  # the routing is not trivial
    assert torch.equal(batched.route_sorted(x), one_by_one)
    assert torch.equal(batched.route_all(x), one_by_one)
    assert torch.equal(batched.route_sorted(x[:1]), one_by_one[:1])  # batch 1
    # Slow, super-class and fast from one pass equal the separate passes.
    log_p, super_logits, routed = batched.outputs_and_route(x)
    torch.testing.assert_close(log_p, batched(x))
    torch.testing.assert_close(super_logits, batched.outputs(x)[1])
    assert torch.equal(routed, one_by_one)


@torch.no_grad()
@pytest.mark.parametrize("fast_mode", ["sorted", "all"])
def test_evaluate_hiernet_gives_slow_fast_and_super_class_in_dataset_class_indices(fast_mode):
    _, reference, _ = make_model(fc_scale=20.0)
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 10, (40,), generator=torch.Generator().manual_seed(1))
    centre_biases(reference, x)
    model = batched_from(reference, TREE, (1, 2), 3)
    model.fast_mode = fast_mode
    assert not torch.equal(model.order, model.rank)  # TREE's order is not its own inverse: a mix-up shows
    _, group_of = grouping.top_level_groups(TREE, 10)
    loader = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]  # three batches, the last short
    out = hiernet.evaluate_hiernet(model, loader, group_of, device="cpu")
    probs = brute_force_probs(reference, x)  # dataset class order
    torch.testing.assert_close(out["log_p"].exp(), probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(out["slow"], probs.argmax(1))
    assert torch.equal(out["fast"], reference.order[reference.route(x)])  # Algorithm 1, mapped to dataset ids
    root = reference.root
    assert torch.equal(out["super"], root.classify(root.edge(x)).argmax(1))
    assert torch.equal(out["super_true"], torch.as_tensor(group_of)[y]) and torch.equal(out["labels"], y)
    # Not trivial: many classes predicted, and fast differs from slow somewhere (a swap of the two shows).
    assert len(set(out["slow"].tolist())) > 3 and (out["fast"] != out["slow"]).any()


def test_hierarchical_report_scores_backbone_slow_and_fast_under_the_found_groups():
    top_groups, group_of = grouping.top_level_groups(FLAT_TREE, 10)
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(3 * torch.randn(12, 10, generator=g), 1)
    ranked = log_p.argsort(1, descending=True)  # slow's ranking
    fast = ranked[:, -1]  # fast predicts slow's worst class
    # Labels: fast's class (rows 0-3), slow's second (4-7), slow's fifth (8-11).
    labels = torch.cat([fast[:4], ranked[4:8, 1], ranked[8:, 4]])
    super_pred = torch.as_tensor(group_of)[fast]
    super_pred[6:] = (super_pred[6:] + 1) % 3  # the super-class node agrees with fast on rows 0-5 only
    results = {
        "labels": labels,
        "log_p": log_p,
        "fast": fast,
        "super": super_pred,
        "backbone_logits": torch.randn(12, 10, generator=g),
    }
    names = [f"c{c}" for c in range(10)]
    data = types.SimpleNamespace(
        class_names=names, num_classes=10, hierarchy=common.Hierarchy(["fine"], [names], [np.arange(10)])
    )
    report = hiernet.hierarchical_report(data, top_groups, group_of, results)
    assert report.keys() == {"groups"}  # the dataset has no coarse level
    groups = common.Hierarchy(["group", "fine"], [["g1", "g2", "g3"], names], [group_of, np.arange(10)])
    by_group = {"group": super_pred.numpy()}
    expected = {
        "backbone": common.hierarchical_metrics(results["backbone_logits"], labels, groups),
        "slow": common.hierarchical_metrics(log_p, labels, groups, level_preds=by_group),
    }
    assert {k: report["groups"][k] for k in expected} == expected
    fast_report = report["groups"]["fast"]
    # Fast's ranking: its class first, then slow's order; top-1 is fast's accuracy, top-5 holds rows 0-7.
    assert fast_report["top1"] == pytest.approx(100 * 4 / 12)
    assert fast_report["top5"] == pytest.approx(100 * 8 / 12)
    assert report["groups"]["slow"]["top1"] == 0 and report["groups"]["slow"]["top5"] == pytest.approx(100 * 8 / 12)
    height = [0 if f == t else 1 if group_of[f] == group_of[t] else 2 for f, t in zip(fast.tolist(), labels.tolist())]
    assert fast_report["hdist@1"] == pytest.approx(np.mean(height))  # LCA height of fast's class and the label
    assert fast_report["consistency"] == pytest.approx(100 * 6 / 12)
    # Every ranking measure equals that of any scores with fast's class on top and slow's order below.
    on_top = log_p.clone()
    on_top[torch.arange(12), fast] = 1e3
    reference = common.hierarchical_metrics(on_top, labels, groups, level_preds=by_group)
    assert {k: v for k, v in fast_report.items() if k != "level_acc"} == {
        k: v for k, v in reference.items() if k != "level_acc"
    }
    # A dataset with a coarse level adds its own measures, under its hierarchy, not the found groups.
    data.hierarchy = common.Hierarchy(["parity", "fine"], [["even", "odd"], names], [np.arange(10) % 2, np.arange(10)])
    report = hiernet.hierarchical_report(data, top_groups, group_of, results)
    assert report["dataset"]["slow"] == common.hierarchical_metrics(log_p, labels, data.hierarchy)
    assert report["dataset"]["backbone"] == common.hierarchical_metrics(
        results["backbone_logits"], labels, data.hierarchy
    )


@torch.no_grad()
def test_elu_head_applies_an_elu_before_pooling_in_the_backbone_and_every_leaf():
    args = hiernet.get_args(["--n", "3", "--elu"])
    assert isinstance(hiernet.make_backbone(args, 10).head.pre, torch.nn.ELU)
    args = hiernet.get_args(["--n", "3", "--elu", "--no-elu-head"])
    assert isinstance(hiernet.make_backbone(args, 10).head.pre, torch.nn.Identity)
    backbone, reference, batched = make_model(FLAT_TREE, (1,), (1,), fc_scale=1.0, elu=True)
    x = torch.randn(5, 3, 16, 16)
    stem_and_blocks = torch.nn.Sequential(backbone.stem, *backbone.blocks)
    pooled = torch.nn.functional.elu(stem_and_blocks(x)).mean((2, 3))
    torch.testing.assert_close(backbone.features(x), pooled)
    logits = backbone(x)
    _, leaf_logits = batched.level_outputs(x)
    for p, offset in enumerate(batched.leaf_offsets):
        classes = batched.order[offset : offset + batched.leaf_fc.sizes[p]]
        torch.testing.assert_close(leaf_logits[:, p, : len(classes)], logits[:, classes], rtol=1e-5, atol=1e-5)
    assert all(isinstance(b.extra, torch.nn.ELU) for b in reference.root.branches)


def test_leaf_init_fresh_and_old_checkpoints(tmp_path):
    backbone = random_backbone()
    fresh = hiernet.build_per_branch(backbone, FLAT_TREE, [1], [1], leaf_init="fresh")
    copied = hiernet.build_per_branch(backbone, FLAT_TREE, [1], [1])
    w = backbone.head.fc.weight[FLAT_TREE[0]]
    assert torch.equal(copied.root.branches[0].fc.weight, w)
    assert not torch.allclose(fresh.root.branches[0].fc.weight, w)
    common.save_checkpoint(tmp_path / "checkpoint.pt", {"model": copied.state_dict()})
    with pytest.raises(SystemExit, match="per-branch HierNet"):
        hiernet.refuse_per_branch_checkpoint(tmp_path / "checkpoint.pt")
    batched = batched_from(copied, FLAT_TREE, (1,), 3)
    common.save_checkpoint(tmp_path / "new.pt", {"model": batched.state_dict()})
    hiernet.refuse_per_branch_checkpoint(tmp_path / "new.pt")  # the batched form passes


def test_backbone_warms_up_for_n_18_only_and_the_control_runs_hiernets_schedule():
    steps = [0, 100, 124, 125, 2000, 3000, 3999]
    for n, warm in ((3, False), (18, True)):
        args = hiernet.get_args(["--n", str(n), "--iterations", "4000"])
        _, backbone_lr = hiernet.stage_schedule(args, 390, "backbone")
        assert (backbone_lr(0) == 0.01) == warm and backbone_lr(125) == 0.1
        e1, hiernet_lr = hiernet.stage_schedule(args, 390, "hiernet")
        e2, control_lr = hiernet.stage_schedule(args, 390, "control")
        assert e1 == e2 and [hiernet_lr(s) for s in steps] == [control_lr(s) for s in steps]
        assert hiernet_lr(0) == 0.01
    args = hiernet.get_args(["--n", "3", "--backbone-warmup", "always"])
    assert hiernet.stage_schedule(args, 390, "backbone")[1](0) == 0.01


def test_authors_test_halves_decode_and_are_checked(capsys):
    mask = hiernet.authors_test_mask()
    assert mask.shape == (10000,) and mask.sum() == 5000
    if SHARED_SPLIT.is_file():  # the authors' file: ids test_NNNNN are official test indices
        split = json.loads(SHARED_SPLIT.read_text())
        assert set(np.flatnonzero(mask)) == {int(s[5:]) for s in split["test"]}
        assert set(np.flatnonzero(~mask)) == {int(s[5:]) for s in split["val"]}
    args = argparse.Namespace(test_halves="authors", seed=0)
    labels = np.zeros(10000, dtype=np.int64)  # labels with 50 + 50 per class under the mask
    labels[mask] = np.arange(5000) % 100
    labels[~mask] = np.arange(5000) % 100
    val, test = hiernet.test_halves(args, labels)
    assert np.array_equal(test, np.flatnonzero(mask)) and len(val) == 5000
    with pytest.raises(SystemExit, match="50 \\+ 50"):  # the same labels in another order
        hiernet.test_halves(args, np.sort(labels))
    assert hiernet.get_args(["--dataset", "cifar100"]).test_halves == "authors"
    assert hiernet.get_args(["--dataset", "shapes"]).test_halves == "seeded"
    with pytest.raises(SystemExit):
        hiernet.get_args(["--dataset", "shapes", "--test-halves", "authors"])
    assert "CIFAR-100's" in capsys.readouterr().err


def test_split_out_of_range_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        hiernet.get_args(["--n", "3", "--split", "9"])
    assert "valid range is 1..8" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hiernet.get_args(["--n", "3", "--split", "5", "--extra-blocks", "5"])
    assert "valid range is 0..4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        hiernet.get_args(["--n", "3", "--depth", "2", "--split", "5"])
    assert "one value per level" in capsys.readouterr().err
    args = hiernet.get_args(["--n", "9", "--elu"])
    assert (args.split, args.extra_blocks, args.p_min) == ([19], [5], [0.005])


def test_schedule_scales_with_the_run_length():
    args = hiernet.get_args(["--n", "3", "--iterations", "4000"])
    epochs, lr_at = hiernet.make_schedule(args, 390, args.iterations)
    assert epochs == 11
    assert [lr_at(s) for s in (0, 124, 125, 1999, 2000, 2999, 3000, 3999)] == [
        0.01,
        0.01,
        0.1,
        0.1,
        0.01,
        0.01,
        0.001,
        0.001,
    ]
    args = hiernet.get_args(["--n", "3"])
    epochs, lr_at = hiernet.make_schedule(args, 390, args.iterations)
    assert epochs == 165 and lr_at(1999) == 0.01 and lr_at(31999) == 0.1 and lr_at(48000) == 0.001


def test_code_schedule_decays_weights_in_proportion_to_the_lr():
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = hiernet.SGDDecoupledDecay([p], lr=0.1, momentum=0.9, decay_per_lr=1e-3)
    p.grad = torch.zeros(3)
    optimizer.step()
    torch.testing.assert_close(p.data, torch.full((3,), 1 - 1e-4))  # weight decay 1e-4 at lr 0.1


def test_full_pipeline_on_tiny_shapes(tmp_path):
    out = tmp_path / "run"
    metrics = hiernet.main(
        [
            "--dataset",
            "shapes",
            "--train-size",
            "192",
            "--test-size",
            "800",
            "--image-size",
            "8",
            "--n",
            "1",
            "--split",
            "1",
            "--extra-blocks",
            "1",
            "--iterations",
            "6",
            "--batch-size",
            "64",
            "--g-max",
            "20",
            "--control",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ]
    )
    for name in (
        "args.json",
        "metrics.json",
        "metrics.jsonl",
        "cpm.npy",
        "tree.json",
        "tree.txt",
        "tree.dot",
        "per_group.json",
        "per_group.txt",
        "backbone/checkpoint.pt",
        "hiernet/checkpoint.pt",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved.keys() == metrics.keys()
    assert saved["slow_acc"] == pytest.approx(metrics["slow_acc"])
    for key in ("backbone_acc", "slow_acc", "fast_acc", "superclass_acc"):
        assert 0 <= saved[key] <= 100
    assert saved["slow_images_per_s"] > 0 and saved["fast_images_per_s"] > 0
    tree = grouping.load_tree(out / "tree.json", 72)
    assert max(len(g) for g in json.loads((out / "tree.json").read_text())["groups"]) <= 20
    per_group = json.loads((out / "per_group.json").read_text())
    assert len(per_group) == len(tree) == saved["n_groups"]
    assert sum(g["images"] for g in per_group) == saved["test_images"]
    cpm = np.load(out / "cpm.npy")
    np.testing.assert_allclose(cpm.sum(1)[cpm.sum(1) > 0], 1.0, rtol=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in records} == {"backbone", "hiernet", "control"}
    # The control: the backbone trained on for as many iterations as HierNet, on the same schedule.
    by_stage = {s: [(r["step"], r["lr"]) for r in records if r["stage"] == s] for s in ("hiernet", "control")}
    assert by_stage["control"] == by_stage["hiernet"] and saved["control_iterations"] == saved["hiernet_iterations"]
    assert 0 <= saved["control_acc"] <= 100
    keys = {"top1", "top5", "level_acc", "mistake_severity", "hdist@1", "hdist@5", "hprecision", "hrecall", "hf1"}
    for hierarchy in ("groups", "dataset"):  # the found groups; shapes' own levels
        for form in ("backbone", "slow", "fast"):
            assert keys <= saved["hierarchical"][hierarchy][form].keys()
    assert saved["hierarchical"]["groups"]["slow"]["top1"] == pytest.approx(saved["slow_acc"])
    assert saved["hierarchical"]["groups"]["fast"]["top1"] == pytest.approx(saved["fast_acc"])
    assert "consistency" in saved["hierarchical"]["groups"]["slow"]
    for form in ("backbone", "slow", "fast", "fast_sorted", "fast_all"):
        assert saved[f"{form}_images_per_s"] > 0 and saved[f"{form}_latency_ms_batch1"] > 0


def test_depth_two_tree_from_the_dataset_runs(tmp_path):
    out = tmp_path / "run"
    metrics = hiernet.main(
        [
            "--dataset",
            "shapes",
            "--train-size",
            "128",
            "--test-size",
            "800",
            "--image-size",
            "8",
            "--n",
            "1",
            "--depth",
            "2",
            "--split",
            "1",
            "2",
            "--extra-blocks",
            "1",
            "--tree-from",
            "dataset",
            "--dry-run",
            "--batch-size",
            "32",
            "--device",
            "cpu",
            "--out-dir",
            str(out),
        ]
    )
    assert metrics["depth"] == 2 and metrics["n_groups"] == 2  # triangle / square, then 6 fills each
    tree = json.loads((out / "tree.json").read_text())["tree"]
    assert all(len(child) == 6 and all(len(g) == 6 for g in child) for child in tree)


def test_random_tree_from_a_given_tree_is_recorded_and_kept_on_resume(tmp_path):
    names = [f"c{i}" for i in range(10)]
    common.write_json(tmp_path / "given.json", grouping.tree_json(TREE, names))
    args = hiernet.get_args(
        ["--dataset", "shapes", "--n", "1", "--depth", "2", "--split", "1", "2", "--extra-blocks", "1"]
        + ["--groups", str(tmp_path / "given.json"), "--tree-from", "random", "--seed", "4"]
    )
    data = argparse.Namespace(num_classes=10)
    run_dir = tmp_path / "run"
    tree, settings = grouping.run_tree(args, data, run_dir, None)
    assert grouping.tree_sizes(tree) == grouping.tree_sizes(TREE) == [[2, 3], 5] and tree != TREE
    assert sorted(grouping.tree_leaves(tree)) == list(range(10))
    assert settings["source"] == "random"
    record = settings["random_tree"]
    assert record["seed"] == 4 and record["from_tree"] == TREE and record["from_sizes"] == [[2, 3], 5]
    assert grouping.random_tree(record["from_tree"], record["seed"]) == tree  # reproducible from tree.json
    # On resume the saved tree and its record are kept (the checkpoint was built on them).
    common.write_json(run_dir / "tree.json", grouping.tree_json(tree, names, **settings))
    args.resume, args.seed = str(run_dir), 5
    assert grouping.run_tree(args, data, run_dir, None) == (tree, settings)


def test_random_tree_pipeline_on_tiny_shapes(tmp_path):
    """--tree-from random: the CPM tree of this run's backbone (from the validation half), its group
    sizes kept and the classes assigned at random, recorded in tree.json."""
    out = tmp_path / "run"
    metrics = hiernet.main(
        ["--dataset", "shapes", "--train-size", "128", "--test-size", "800", "--image-size", "8"]
        + ["--n", "1", "--split", "1", "--extra-blocks", "1", "--g-max", "20", "--dry-run", "--batch-size", "32"]
        + ["--tree-from", "random", "--seed", "3", "--device", "cpu", "--out-dir", str(out)]
    )
    made = json.loads((out / "tree.json").read_text())
    tree, record = grouping.load_tree(out / "tree.json", 72), made["random_tree"]
    assert made["source"] == metrics["tree_source"] == "random"
    cpm_tree = grouping.build_tree(np.load(out / "cpm.npy"), 1, [20], hiernet.PAPER_P_MIN[False])
    assert record["from"] == "cpm" and record["from_tree"] == cpm_tree and record["seed"] == 3
    assert grouping.tree_sizes(tree) == grouping.tree_sizes(cpm_tree) == record["from_sizes"]
    assert metrics["group_sizes"] == [len(g) for g in cpm_tree] and metrics["n_groups"] == len(cpm_tree)
    assert grouping.random_tree(cpm_tree, 3) == tree and tree != cpm_tree
    per_group = json.loads((out / "per_group.json").read_text())
    assert [g["classes"] for g in per_group] == tree
    # Nothing chosen on the test half: the CPM behind the sizes is the backbone's on the validation half.
    np.testing.assert_allclose(backbone_cpm_on_validation_half(out), np.load(out / "cpm.npy"), rtol=1e-6, atol=1e-9)
    assert (out / "tree_copied.txt").read_text() == grouping.tree_text(cpm_tree, made["class_names"])


def backbone_cpm_on_validation_half(run_dir):
    """The CPM of a run's saved backbone on its validation half, computed afresh from the checkpoint."""
    args = argparse.Namespace(**common.run_settings(common.read_run_args(run_dir)))
    data = common.load_data(args)
    val = data.test.subset(hiernet.test_halves(args, data.test.labels.numpy())[0])
    model = hiernet.make_backbone(args, data.num_classes, data.train.images.shape[1])
    common.load_weights(model, common.load_checkpoint(run_dir / "backbone" / "checkpoint.pt")["model"], run_dir)
    loader = common.GpuLoader(val.images, val.labels, 500, device=torch.device("cpu"), mean=data.mean, std=data.std)
    with hiernet.exact_fp32():
        return grouping.confusion_probability_matrix(model.eval(), loader, data.num_classes, device="cpu", dtype="fp32")


@pytest.mark.parametrize("flag", ["--groups", "--backbone-ckpt"])
def test_a_missing_input_file_is_refused_before_the_backbone_trains(flag, tmp_path, capsys):
    argv = ["--dataset", "shapes", "--n", "1", "--split", "1", "--extra-blocks", "1", "--dry-run"]
    argv += ["--out-dir", str(tmp_path / "run"), flag, str(tmp_path / "missing")]
    with pytest.raises(SystemExit) as stop:
        hiernet.main(argv)
    out = capsys.readouterr()
    assert stop.value.code == 2 and f"{flag} {tmp_path / 'missing'}: file not found" in out.err
    assert "[backbone] epoch" not in out.out and not (tmp_path / "run").exists()


def test_a_backbone_checkpoint_of_another_size_is_one_line_naming_the_mismatch(tmp_path):
    other = common.CifarResNet(2, 72)  # n = 2; the run asks for n = 1 on the 72 shapes classes
    torch.save({"model": other.state_dict()}, tmp_path / "other.pt")
    argv = ["--dataset", "shapes", "--n", "1", "--split", "1", "--extra-blocks", "1", "--dry-run"]
    argv += ["--out-dir", str(tmp_path / "run"), "--backbone-ckpt", str(tmp_path / "other.pt")]
    with pytest.raises(SystemExit) as stop:  # common.fail: the message is the exit's, status 1, one line
        hiernet.main(argv)
    message = str(stop.value.code)
    assert "\n" not in message and f"--backbone-ckpt {tmp_path / 'other.pt'}: does not fit this CifarResNet" in message
    assert "Unexpected key(s)" in message  # the reason, not load_state_dict's first line ("Error(s) in ...")


def test_a_run_from_before_elu_head_and_shortcut_resumes_as_it_trained(tmp_path):
    """An ELU run whose args.json predates --elu-head / --shortcut had no ELU before pooling and option-A
    shortcuts: a resume builds that backbone, not today's defaults (--elu-head on)."""
    saved = {**vars(hiernet.get_args(["--n", "3", "--elu", "--dataset", "shapes"])), "script": "hiernet"}
    old = {k: v for k, v in saved.items() if k not in ("elu_head", "shortcut")}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text(json.dumps({**old, "resume": None}))
    args = hiernet.get_args(["--resume", str(tmp_path / "run")])
    assert args.elu_head is False and args.shortcut == "A"
    assert isinstance(hiernet.make_backbone(args, 10).head.pre, torch.nn.Identity)
    (tmp_path / "run" / "args.json").write_text(json.dumps({**saved, "resume": None}))  # recorded: kept
    assert hiernet.get_args(["--resume", str(tmp_path / "run")]).elu_head is True
