"""Tests for coarse_outer_product.py: the outer-product layer, CH / CVC assignment, the diversity
losses of Eq. 3 and Eq. 4, the frozen coarse network, and smoke runs of every method."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coarse_outer_product as cop
import common

ROOT = Path(__file__).resolve().parent.parent

# Tiny VGG configurations for CPU tests; the last convolution keeps 512 channels so that the
# outer product still has K x 512 inputs, as in the paper.
TINY_VGG = {13: [8, "M", 8, "M", 8, "M", 8, "M", 512, "M"], 16: [8, "M", 8, "M", 8, 8, "M", 8, "M", 512, "M"]}


@pytest.fixture
def tiny_vgg(monkeypatch):
    for depth, config in TINY_VGG.items():
        monkeypatch.setitem(common.VGG_CONFIGS, depth, config)


def test_outer_product_matches_einsum():
    torch.manual_seed(0)
    probs, features = torch.rand(5, 10).softmax(1), torch.randn(5, 512)
    z = cop.outer_product(probs, features)
    assert z.shape == (5, 5120)
    expected = torch.einsum("bk,bd->bkd", probs, features).reshape(5, -1)
    torch.testing.assert_close(z, expected)
    # the layout: entry k*512 + d is probs[k] * features[d]
    assert torch.isclose(z[3, 7 * 512 + 100], probs[3, 7] * features[3, 100])


def test_ch_assignment_recovers_planted_hierarchy():
    rng = np.random.default_rng(0)
    num_classes, k, per_class = 12, 4, 30
    planted = rng.integers(0, k, num_classes)
    labels = np.repeat(np.arange(num_classes), per_class)
    activations = rng.random((len(labels), k))
    activations[np.arange(len(labels)), planted[labels]] += 1.0
    # a third of every label's images prefer another neuron, weakly: the label still goes to the planted one
    stray = rng.random(len(labels)) < 0.33
    activations[stray, (planted[labels[stray]] + 1) % k] += 1.3
    result = cop.ch_assignment(torch.tensor(activations, dtype=torch.float32), torch.tensor(labels), num_classes)
    np.testing.assert_array_equal(result.numpy(), planted)


def test_cvc_assignment_is_per_image_whatever_the_label():
    activations = torch.tensor([[0.1, 2.0, 0.0], [3.0, 0.2, 0.1], [0.0, 0.0, 0.5], [0.0, 1.0, 0.9]])
    # images 0 and 1 share a label but fall into different categories
    np.testing.assert_array_equal(cop.cvc_assignment(activations).numpy(), [1, 0, 2, 1])


def test_ch_rules_sum_and_vote_on_hand_built_activations():
    # label 0: one image strongly on neuron 0, two weakly on neuron 1 -> sum picks 0 (5 > 2), vote picks 1 (2 > 1)
    # label 1: two images on neuron 2, one all-zero image that abstains from the vote (it would favour neuron 0)
    activations = torch.tensor(
        [[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.4], [0.0, 0.0, 0.3], [0.0, 0.0, 0.0]]
    )
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(cop.ch_assignment(activations, labels, 2, "sum").numpy(), [0, 2])
    np.testing.assert_array_equal(cop.ch_assignment(activations, labels, 2, "vote").numpy(), [1, 2])
    # a label whose summed activation and vote agree gets the same neuron under both rules
    agree = torch.tensor([[0.0, 3.0], [0.5, 2.0]])
    for rule in ("sum", "vote"):
        assert cop.ch_assignment(agree, torch.tensor([0, 0]), 1, rule).tolist() == [1]


def test_keras_weight_decay_step_equals_the_gradient_of_the_l2_penalty():
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    reference = copy.deepcopy(net)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    wd, lr = 1e-3, 0.1
    # ours: the data loss only, the L2 in the optimizer's parameter groups (keras convention)
    optimizer = torch.optim.SGD(cop.sgd_param_groups(net.parameters(), wd, "keras"), lr=lr, momentum=0.9)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    # reference: Keras' kernel_regularizer=l2(wd), i.e. + wd * sum(w^2) of the weight matrices in the loss
    plain = torch.optim.SGD(reference.parameters(), lr=lr, momentum=0.9)
    penalty = wd * sum((m.weight**2).sum() for m in reference if isinstance(m, torch.nn.Linear))
    (F.cross_entropy(reference(x), y) + penalty).backward()
    plain.step()
    for ours, ref in zip(net.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, ref)
    # the pytorch convention decays every parameter by wd (half the Keras gradient on the weights)
    groups = cop.sgd_param_groups(net.parameters(), wd, "pytorch")
    assert len(groups) == 1 and groups[0]["weight_decay"] == wd and len(groups[0]["params"]) == 6
    keras = cop.sgd_param_groups(net.parameters(), wd, "keras")
    assert [len(g["params"]) for g in keras] == [2, 4] and [g["weight_decay"] for g in keras] == [2 * wd, 0.0]


def test_default_weight_decay_reaches_every_parameter_as_pytorch_sgd():
    # The base code's SGD(model.parameters(), weight_decay=wd): biases and batch norm decay too.
    args = cop.get_args([])
    assert args.wd_convention == "pytorch" and args.weight_decay == 1e-3
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )
    groups = cop.sgd_param_groups(net.parameters(), args.weight_decay, args.wd_convention)
    decayed = {id(p) for g in groups if g["weight_decay"] == 1e-3 for p in g["params"]}
    assert decayed == {id(p) for p in net.parameters()}


def test_diversity_networks_are_off_by_default():
    # Eq. 3 / Eq. 4 feed no table of the paper: only the plain ETE network (Table VII) by default.
    assert cop.get_args([]).diversity == ["none"]
    assert cop.get_args(["--diversity", "none", "eq3", "eq4"]).diversity == ["none", "eq3", "eq4"]


def test_whole_set_channel_statistics():
    # 12,000 images whose last 2,000 are much brighter in channel 0: the first 10k would miss them
    gen = torch.Generator().manual_seed(8)
    images = torch.randint(0, 100, (12000, 3, 4, 4), dtype=torch.uint8, generator=gen)
    images[10000:, 0] += 150
    mean, std = cop.whole_set_channel_stats(images, chunk=1000)
    x = images.double() / 255
    np.testing.assert_allclose(mean, x.mean((0, 2, 3)).numpy(), rtol=1e-9)
    np.testing.assert_allclose(std, x.transpose(0, 1).reshape(3, -1).std(1).numpy(), rtol=1e-7)
    first_10k, _ = common.channel_stats(images)
    assert mean[0] > first_10k[0] + 0.05


def test_degenerate_categories_warn_once(capsys):
    assert cop.degenerate_check("CH", [3, 4, 5], "fine labels") is None
    assert capsys.readouterr().err == ""
    collapsed = cop.ch_assignment(torch.tensor([[1.0, 0.0, 0.0]] * 6), torch.arange(6), 6)  # every label to 0
    entry = cop.degenerate_check("CH", np.bincount(collapsed.numpy(), minlength=3), "fine labels")
    lines = capsys.readouterr().err.splitlines()  # warnings go to stderr
    assert len(lines) == 1 and lines[0].startswith("warning: CH: degenerate")
    assert entry["single"] and entry["used"] == 1 and entry["empty"] == 2
    entry = cop.degenerate_check("CVC", [5, 0, 7], "training images")
    assert not entry["single"] and entry["empty"] == 1


def test_selection_on_validation_keeps_two_categories_alive():
    def run(scale, val, test, alive):
        return {"diversity": {"scale": scale}, "val": val, "test": test, "usage": {"val": {"used_over_1pct": alive}}}

    runs = [run(0.1, 70.0, 90.0, 1), run(1.0, 65.0, 60.0, 3), run(10.0, 66.0, 50.0, 2)]
    assert cop.select_on_validation(runs)["diversity"]["scale"] == 10.0  # not the collapsed one, not by test
    assert cop.select_on_validation(runs[:1]) is None


def test_matching_level_finds_a_partition_up_to_relabelling():
    hierarchy = common.Hierarchy(["coarse", "fine"], [["a", "b"], list("wxyz")], [np.array([0, 0, 1, 1]), np.arange(4)])
    level, to_level = cop.matching_level(np.array([1, 1, 0, 0]), hierarchy)
    assert level == "coarse" and to_level.tolist() == [1, 0]
    assert cop.matching_level(np.array([0, 1, 0, 1]), hierarchy) is None


def test_epochs_follow_the_paper_per_table():
    args = cop.get_args([])
    counts = {n: cop.stage_epochs(args, n) for n in ("baseline", "coarse_ch", "main_ch", "coarse_cvc", "main_cvc")}
    assert counts == {"baseline": 81, "coarse_ch": 31, "main_ch": 66, "coarse_cvc": 32, "main_cvc": 76}
    assert cop.stage_epochs(args, "ete_eq4_x10") == 67 and args.stopping == "fixed"
    args = cop.get_args(["--epochs", "5", "--coarse-epochs", "3"])
    assert cop.stage_epochs(args, "main_cvc") == 5 and cop.stage_epochs(args, "coarse_ch") == 3


def eq3_by_loops(o, lambda1, lambda2, lambda3):
    B, K = o.shape
    c_of = [int(torch.argmax(o[i])) for i in range(B)]
    sigma = [sum((o[i] for i in range(B) if c_of[i] == c), torch.zeros(K, dtype=o.dtype)) for c in range(K)]
    loss = 0.0
    for c in range(K):
        n = torch.linalg.norm(sigma[c])
        loss = loss + lambda1 * (-(n**2) + lambda2 * n**4)
    for c in range(K):
        for c2 in range(K):
            if c != c2:
                loss = loss + lambda3 * torch.dot(sigma[c], sigma[c2])
    return loss


def test_eq3_matches_loop():
    torch.manual_seed(1)
    o = torch.randn(9, 4, dtype=torch.float64).mul(2).softmax(1)
    for lambdas in ((1.0, 0.3, 0.5), (1e-3, 3e-3, 1e-4)):
        torch.testing.assert_close(cop.diversity_eq3(o, *lambdas), eq3_by_loops(o, *lambdas))


def test_eq4_matches_loop():
    torch.manual_seed(2)
    o = torch.randn(7, 5, dtype=torch.float64).softmax(1)
    expected = sum(torch.dot(o[i], o[j]) for i in range(7) for j in range(7) if i != j)
    torch.testing.assert_close(cop.diversity_eq4(o, 0.7), 0.7 * expected)


def test_eq4_pushes_a_collapsed_batch_apart():
    torch.manual_seed(3)
    logits = torch.randn(32, 6) * 0.3
    logits[:, 0] += 4.0  # every image in category 0
    logits.requires_grad_(True)
    assert logits.argmax(1).unique().numel() == 1
    optimizer = torch.optim.SGD([logits], lr=0.5)
    first = None
    for _ in range(30):
        loss = cop.diversity_eq4(logits.softmax(1), 0.1)
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    assert logits.argmax(1).unique().numel() >= 4


def test_frozen_coarse_network_gets_no_gradient(tiny_vgg):
    torch.manual_seed(4)
    coarse = cop.make_vgg(13, 3)
    net = cop.OuterProductNet(coarse, cop.make_vgg(16, 7, 3 * 512))
    net.train()
    assert not coarse.training and net.main.training
    stats_before = [b.clone() for b in coarse.buffers()]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(net(x), y).backward()
    assert all(p.grad is None and not p.requires_grad for p in coarse.parameters())
    assert all(p.grad is not None for p in net.main.parameters())
    for before, after in zip(stats_before, coarse.buffers()):
        torch.testing.assert_close(before, after)  # batch-norm statistics untouched
    net.eval()
    with torch.no_grad():  # the forward is the classifier on the outer product of softmax and features
        expected = net.main.head.fc(torch.einsum("bk,bd->bkd", coarse(x).softmax(1), net.main.features(x)).flatten(1))
        torch.testing.assert_close(net(x), expected)


def test_end_to_end_coarse_head_is_a_distribution(tiny_vgg):
    torch.manual_seed(5)
    net = cop.EndToEndNet(num_classes=7, k=3).eval()
    logits, coarse = net.forward_with_coarse(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 7) and coarse.shape == (4, 3)
    torch.testing.assert_close(coarse.sum(1), torch.ones(4))


def vgg_features_by_hand(vgg, x):
    # the conv stages, then global average pooling: VGG's features without calling Backbone.features
    for stage in vgg.stages:
        x = stage(x)
    return x.mean((2, 3))


def test_end_to_end_forward_is_classifier_of_softmax_outer_features(tiny_vgg):
    torch.manual_seed(10)
    net = cop.EndToEndNet(num_classes=7, k=3).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        f = vgg_features_by_hand(net.main, x)
        coarse = net.coarse_layers.layers(f).softmax(1)
        expected = net.main.head.layers(torch.einsum("bk,bd->bkd", coarse, f).reshape(4, 3 * 512))
        logits, got_coarse = net.forward_with_coarse(x)
        torch.testing.assert_close(got_coarse, coarse)
        torch.testing.assert_close(logits, expected)
        torch.testing.assert_close(net(x), expected)


def test_end_to_end_fine_loss_trains_the_coarse_layers(tiny_vgg):
    # Table VII: ETE has no coarse labels; the coarse head learns only through the fine cross-entropy,
    # and the shared conv features get gradient through both branches (eval mode: no dropout noise)
    torch.manual_seed(11)
    net = cop.EndToEndNet(num_classes=7, k=3).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(net(x), y).backward()
    for name, p in net.coarse_layers.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    f = vgg_features_by_hand(net.main, x)
    coarse = net.coarse_layers.layers(f).softmax(1)
    hand = F.cross_entropy(net.main.head.layers(torch.einsum("bk,bd->bkd", coarse, f).flatten(1)), y)
    params = list(net.parameters())
    for p, g in zip(params, torch.autograd.grad(hand, params)):
        torch.testing.assert_close(p.grad, g)


def projection_net(seed=12, num_classes=7, k=3):
    torch.manual_seed(seed)
    vgg = cop.make_vgg(16, num_classes).eval()
    net = cop.CoarseProjectionNet(vgg, num_classes, k)
    with torch.no_grad():  # non-trivial batch-norm statistics and affine parameters, so the norm matters
        net.norm.running_mean.uniform_(-1, 1)
        net.norm.running_var.uniform_(0.5, 2)
        net.norm.weight.uniform_(0.5, 2)
        net.norm.bias.uniform_(-1, 1)
    return vgg, net


def test_coarse_projection_forward_is_norm_relu_coarse_then_recovery(tiny_vgg):
    vgg, net = projection_net()
    net.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        z = vgg.head.layers(vgg_features_by_hand(vgg, x))
        bn = net.norm
        normed = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        hidden = (normed @ net.coarse_layer.weight.t() + net.coarse_layer.bias).clamp(min=0)
        expected = hidden @ net.recovery_layer.weight.t() + net.recovery_layer.bias
        torch.testing.assert_close(net.coarse_activations(x), hidden)
        torch.testing.assert_close(net(x), expected)
    assert (hidden == 0).any() and (hidden > 0).any()  # the ReLU is exercised


def test_coarse_projection_keeps_the_vgg_frozen_and_in_eval_mode(tiny_vgg):
    vgg, net = projection_net()
    net.train()
    assert not vgg.training and not any(m.training for m in vgg.modules()) and net.norm.training
    buffers = [b.clone() for b in vgg.buffers()]
    F.cross_entropy(net(torch.randn(6, 3, 32, 32)), torch.tensor([0, 1, 2, 3, 4, 5])).backward()
    assert all(p.grad is None for p in vgg.parameters())
    assert all(p.grad is not None for m in (net.norm, net.coarse_layer, net.recovery_layer) for p in m.parameters())
    for before, after in zip(buffers, vgg.buffers()):
        torch.testing.assert_close(before, after)  # batch-norm statistics of the frozen VGG untouched


def test_recovery_loss_is_cross_entropy_plus_l1_of_the_recovery_weights(tiny_vgg, tmp_path, monkeypatch):
    # loss_fn is local to train_recovery_layers: stub train_stage to capture it instead of training
    captured = {}

    def fake_train_stage(ctx, name, model, loss_fn, train_loader, validate, epochs, params=None, **kw):
        captured.update(loss_fn=loss_fn, params=params, epochs=epochs)
        return model, {}

    monkeypatch.setattr(cop, "train_stage", fake_train_stage)
    args = cop.get_args(["--recovery-l1", "0.5", "--coarse-k", "3", "--recovery-epochs", "4"])
    labels = torch.arange(7).repeat(2)
    ctx = {
        "args": args,
        "run_dir": tmp_path,
        "device": "cpu",
        "num_classes": 7,
        "fine": {"train": labels, "val": labels},
        "train_loader": lambda y: None,
    }
    torch.manual_seed(13)
    pretrained = cop.make_vgg(16, 7).eval()
    net, _ = cop.train_recovery_layers(ctx, pretrained, restart=0)
    trainable = [*net.norm.parameters(), *net.coarse_layer.parameters(), *net.recovery_layer.parameters()]
    assert {id(p) for p in captured["params"]} == {id(p) for p in trainable} and captured["epochs"] == 4
    net.train()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 4, 6])
    loss, stats = captured["loss_fn"](net, x, y)
    logits = net(x)
    l1 = 0.5 * torch.linalg.vector_norm(net.recovery_layer.weight.flatten(), ord=1)
    torch.testing.assert_close(stats["l1"], l1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y) + l1)
    assert stats["correct"] == (logits.argmax(1) == y).sum()


def test_build_coarse_categories_keeps_the_balanced_restart_and_maps_cvc_per_image(tmp_path, monkeypatch):
    num_classes, k = 6, 3
    planted = np.array([0, 1, 2, 0, 1, 2])  # restart 1's hierarchy: 2 labels per category
    rng = np.random.default_rng(14)
    fine_train = torch.tensor(np.repeat(np.arange(num_classes), 6))
    balanced = rng.random((len(fine_train), k))
    balanced[np.arange(len(fine_train)), planted[fine_train]] += 2.0
    balanced[::6, 0] += 3.0  # one image per label strays to neuron 0: CVC differs from the label's CH category
    sizes = {"train": len(fine_train), "val": 9, "test": 11}
    planted_acts = {
        0: {s: rng.random((n, k)) * 0.1 + np.array([1.0, 0.0, 0.0]) for s, n in sizes.items()},  # collapsed
        1: {"train": balanced, "val": rng.random((9, k)), "test": rng.random((11, k))},
    }
    planted_acts = {r: {s: torch.tensor(a, dtype=torch.float32) for s, a in d.items()} for r, d in planted_acts.items()}

    class StubNet:
        def __init__(self, restart):
            self.restart = restart

        def coarse_activations(self, x):
            raise AssertionError("the stubbed run_outputs never calls it")

    def fake_run_outputs(ctx, forward, split):
        # outputs come in a shuffled loader order; the index maps each row back to its image
        acts = planted_acts[forward.__self__.restart][split.removesuffix("_full")]
        perm = torch.tensor(np.random.default_rng(len(acts)).permutation(len(acts)))
        return acts[perm], perm

    monkeypatch.setattr(cop, "train_recovery_layers", lambda ctx, pretrained, r: (StubNet(r), {"epochs": 1}))
    monkeypatch.setattr(cop, "run_outputs", fake_run_outputs)
    args = cop.get_args(["--coarse-k", str(k), "--ch-restarts", "2"])
    ctx = {"args": args, "run_dir": tmp_path, "num_classes": num_classes, "fine": {"train": fine_train}}
    hierarchy, cvc, report = cop.build_coarse_categories(ctx, pretrained=None)
    assert report["chosen_restart"] == 1
    assert [r["normalised_entropy"] for r in report["restarts"]] == [0.0, pytest.approx(1.0)]
    np.testing.assert_array_equal(hierarchy.numpy(), planted)
    assert (planted_acts[1]["train"].argmax(1) != torch.tensor(planted)[fine_train]).any()
    for split in sizes:
        np.testing.assert_array_equal(cvc[split].numpy(), planted_acts[1][split].argmax(1).numpy())


def test_coarse_usage_counts_categories_and_the_one_percent_rule(monkeypatch):
    k, counts = 5, [120, 77, 2, 1, 0]  # category 2 holds exactly 1% of 200 images (kept), category 3 0.5%
    labels = torch.tensor(np.repeat(np.arange(k), counts))
    max_prob = torch.linspace(0.4, 0.9, len(labels))
    coarse = ((1 - max_prob) / (k - 1))[:, None].repeat(1, k)
    coarse[torch.arange(len(labels)), labels] = max_prob
    monkeypatch.setattr(cop, "run_outputs", lambda ctx, forward, split: ((None, coarse), torch.arange(len(labels))))
    ctx = {"args": cop.get_args(["--coarse-k", str(k)])}
    usage = cop.coarse_usage(ctx, type("Model", (), {"forward_with_coarse": None}), "val")
    assert usage["counts"] == counts and usage["used"] == 4 and usage["used_over_1pct"] == 3
    assert usage["normalised_entropy"] == pytest.approx(cop.normalised_entropy(counts))
    assert usage["mean_max_prob"] == pytest.approx(0.65)  # mean of a linspace from 0.4 to 0.9


def test_per_category_accuracy_is_recall_and_none_for_an_absent_category():
    targets = torch.tensor([0, 0, 0, 0, 1, 1])
    logits = torch.tensor(
        [[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [3.0, 0.0, 2.0], [0.0, 0.1, 0.2], [0.9, 0.3, 0.0], [0.0, 1.0, 0.5]]
    )  # predictions 0, 0, 0, 2, 0, 1
    # category 0: 3 of its 4 images; category 1: 1 of 2 (precision would give 75 / 100); category 2: no image
    assert cop.per_category_accuracy(logits, targets, 3) == [pytest.approx(75.0), pytest.approx(50.0), None]


def test_normalised_entropy_hand_values():
    # H(1/2, 1/4, 1/4) = 1.5 ln 2 over ln 4 = 2 ln 2: the empty category counts in the maximum
    assert cop.normalised_entropy([2, 1, 1, 0]) == pytest.approx(0.75)
    assert cop.normalised_entropy([1, 1, 0, 0]) == pytest.approx(0.5)
    assert cop.normalised_entropy([0, 0, 0]) == 0.0


def test_balance_and_purity():
    assert cop.normalised_entropy([5, 5, 5]) == pytest.approx(1.0)
    assert cop.normalised_entropy([9, 0, 0]) == 0.0
    assert cop.purity([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert cop.purity([0, 0, 0, 0], [0, 0, 1, 1]) == 0.5


TINY = [
    "--image-size",
    "32",
    "--train-size",
    "300",
    "--test-size",
    "100",
    "--val-per-class",
    "1",
    "--batch-size",
    "16",
    "--epochs",
    "1",
    "--coarse-epochs",
    "1",
    "--pretrain-epochs",
    "1",
    "--recovery-epochs",
    "1",
    "--ch-restarts",
    "2",
    "--coarse-k",
    "4",
    "--device",
    "cpu",
]


def test_early_stopping_keeps_the_best_weights(tmp_path):
    model = torch.nn.Linear(2, 1)
    stopper = cop.EarlyStopping(tmp_path, patience=2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        assert not stopper.update(1, 0.5, model)  # best so far: saved
        model.weight.fill_(2.0)
        assert not stopper.update(2, 0.7, model)
        assert stopper.update(3, 0.6, model)  # two epochs without a lower loss
    assert stopper.best_epoch == 1
    best = common.load_checkpoint(stopper.best_path)
    assert torch.equal(best["weight"], torch.ones(1, 2))


HIERARCHICAL_KEYS = {
    "top1",
    "top5",
    "level_acc",
    "mistake_severity",
    "hdist@1",
    "hdist@5",
    "hprecision",
    "hrecall",
    "hf1",
}


@pytest.mark.parametrize("method", ["baseline", "ch", "cvc", "ete"])
def test_smoke_each_method(tiny_vgg, tmp_path, method):
    out = tmp_path / method
    flags = ["--method", method, "--out-dir", str(out), "--diversity", "none", "eq3", "--diversity-scales", "30"]
    metrics = cop.main(TINY + flags + ["--dry-run"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"].keys() == metrics["accuracy"].keys()
    expected_rows = {
        "baseline": {"baseline"},
        "ch": {"pretrain", "coarse_ch", "main_ch"},
        "cvc": {"pretrain", "coarse_cvc", "main_cvc"},
        "ete": {"ete"},
    }[method]
    assert expected_rows <= set(saved["accuracy"]) <= expected_rows | {"ete_eq3"}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for stage, row in saved["accuracy"].items():
        assert all(0.0 <= row[s] <= 100.0 for s in ("train", "train_eval_mode", "val", "test"))
        assert row["epoch_seconds_median"] > 0
        # the Trainset column is the training-mode accuracy of the reported epoch, as the base code prints it
        reported = row.get("best_epoch", row["epochs"])
        logged = [r["train_acc"] for r in records if r.get("stage") == stage and r["epoch"] == reported]
        assert row["train"] == logged[-1]
    fine_rows = expected_rows - {"coarse_ch", "coarse_cvc"}
    assert set(saved["hierarchical"]) >= fine_rows
    for h in saved["hierarchical"].values():  # common.hierarchical_metrics against the shapes levels
        assert HIERARCHICAL_KEYS <= set(h) and set(h["level_acc"]) == set(common.shapes_hierarchy().level_names)
    tables = load_report().run_tables(out)  # Tables I-VII beside the paper's, from metrics.json
    for title in ("Table I.", "Table II.", "Table III.", "Table IV.", "Table V.", "Table VI.", "Table VII.", "Fig. 3."):
        assert title in tables
    assert "| network | epochs | train | validation | test | paper train / val / test (CIFAR-100) |" in tables
    assert not (out / "tables.md").exists() and (out / "metrics.jsonl").is_file()
    assert isinstance(saved["degenerate"], dict)
    if method in ("ch", "cvc"):
        text = (out / "coarse_categories.md").read_text()
        assert "CH category hierarchy" in text and "CVC coarse visual categories" in text
        per_category = saved["coarse_per_category_accuracy"][method]["test"]
        assert len(per_category) == 4
        assignment = saved["ch_hierarchy"]["assignment"]
        assert len(assignment) == 72 and set(assignment) <= set(range(4))
        assert len(saved["ch_hierarchy"]["restarts"]) == 2
        # a collapsed or partly empty assignment is flagged in metrics.json and in the tables
        counts = np.bincount(assignment, minlength=4)
        assert ("ch" in saved["degenerate"]) == bool((counts == 0).any())
    if method == "ete":
        usage = saved["ete_coarse_usage"]["test"]
        assert 1 <= usage["used"] <= 4 and sum(usage["counts"]) > 0
        sweep = saved["ete_sweep"]["eq3"]
        assert [r["scale"] for r in sweep["runs"]] == [30.0]
        assert sweep["runs"][0]["lambda1"] == pytest.approx(30 * 1e-3) and sweep["runs"][0]["lambda2"] == 3e-3
        for key, usage in saved["ete_usage"].items():  # every collapsed ETE network is flagged
            assert (key in saved["degenerate"]) == (usage["train"]["used"] < 4)
            if key in saved["degenerate"]:
                assert "degenerate" in tables


def test_smoke_one_method_per_call_then_all_then_resume(tiny_vgg, tmp_path):
    out = tmp_path / "all"
    flags = ["--diversity", "none", "eq4", "--diversity-scales", "1", "--ch-restarts", "1", "--dry-run"]
    cop.main(TINY + ["--out-dir", str(out), "--method", "ch"] + flags)

    def pretrain_lines():
        return [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"pretrain"' in line]

    before = pretrain_lines()
    # the next call in the same run directory reuses CH's early-stopped VGG16 and categories for CVC
    first = cop.main(["--resume", str(out), "--method", "all"])
    assert pretrain_lines() == before
    assert {"baseline", "pretrain", "coarse_ch", "main_ch", "coarse_cvc", "main_cvc", "ete"} <= set(first["accuracy"])
    for name in ("coarse_categories.md", "coarse_accuracy_per_category.md"):
        assert (out / name).is_file()
    lines = len((out / "metrics.jsonl").read_text().splitlines())
    again = cop.main(["--resume", str(out), "--method", "all"])  # every stage is finished: nothing runs again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == lines
    for key, row in first["accuracy"].items():
        assert again["accuracy"][key]["test"] == pytest.approx(row["test"])


def test_bad_flags(tiny_vgg, tmp_path):
    with pytest.raises(SystemExit):
        cop.get_args(["--coarse-k", "1"])
    with pytest.raises(SystemExit, match="at least 32"):
        cop.main(TINY + ["--image-size", "16", "--out-dir", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="more than"):
        cop.main(TINY + ["--coarse-k", "80", "--out-dir", str(tmp_path / "b")])


def load_report():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
