import json

import numpy as np
import pytest
import torch

import common
import grouping
import hiernet

# 10 classes; a depth-2 tree: group 1 has two subgroups, group 2 is a leaf group.
TREE = [[[3, 7], [0, 5, 9]], [1, 2, 4, 6, 8]]


def random_backbone(n=1, num_classes=10, seed=0):
    """A CifarResNet with random BatchNorm statistics and affine parameters (as after training)."""
    torch.manual_seed(seed)
    backbone = common.CifarResNet(n, num_classes)
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    backbone.head.fc.weight.data.mul_(5)
    return backbone.eval()


def make_model(tree=TREE, splits=(1, 2), extras=(1, 1), fc_scale=5.0):
    backbone = random_backbone()
    model = hiernet.build_hiernet(backbone, tree, list(splits), list(extras)).eval()
    for m in model.modules():  # larger random FCs so the node softmaxes are far from uniform
        if isinstance(m, torch.nn.Linear):
            m.weight.data.mul_(fc_scale)
    return backbone, model


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
    _, model = make_model()
    x = torch.randn(6, 3, 16, 16)
    log_p = model(x)
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
    _, model = make_model(fc_scale=200.0)  # near one-hot softmaxes at every node
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


@torch.no_grad()
def test_weight_transfer_reproduces_the_backbone_on_every_path():
    backbone, model = make_model(fc_scale=1.0)
    x = torch.randn(5, 3, 16, 16)
    features, logits = backbone.features(x), backbone(x)
    outputs = model.root.leaf_group_outputs(x)
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
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"backbone", "hiernet"}


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
