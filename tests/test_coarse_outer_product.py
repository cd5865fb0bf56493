"""Tests for coarse_outer_product.py: the outer-product layer, CH / CVC assignment, the diversity
losses of Eq. 3 and Eq. 4, the frozen coarse network, and smoke runs of every method."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import coarse_outer_product as cop
import common

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


@pytest.mark.parametrize("method", ["baseline", "ch", "cvc", "ete"])
def test_smoke_each_method(tiny_vgg, tmp_path, method):
    out = tmp_path / method
    metrics = cop.main(TINY + ["--method", method, "--out-dir", str(out), "--diversity", "eq3", "--dry-run"])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"].keys() == metrics["accuracy"].keys()
    expected_rows = {
        "baseline": {"baseline"},
        "ch": {"pretrain", "coarse_ch", "main_ch"},
        "cvc": {"pretrain", "coarse_cvc", "main_cvc"},
        "ete": {"ete"},
    }[method]
    assert set(saved["accuracy"]) == expected_rows
    for row in saved["accuracy"].values():
        assert all(0.0 <= row[s] <= 100.0 for s in ("train", "val", "test"))
        assert row["epoch_seconds_median"] > 0
    assert (out / "accuracy_table.md").is_file() and (out / "metrics.jsonl").is_file()
    if method in ("ch", "cvc"):
        text = (out / "coarse_categories.md").read_text()
        assert ("CH category hierarchy" in text) == (method == "ch")
        per_category = saved["coarse_per_category_accuracy"][method]["test"]
        assert len(per_category) == 4
        assignment = saved["ch_hierarchy"]["assignment"]
        assert len(assignment) == 72 and set(assignment) <= set(range(4))
        assert len(saved["ch_hierarchy"]["restarts"]) == 2
    if method == "ete":
        usage = saved["ete_coarse_usage"]["test"]
        assert 1 <= usage["used"] <= 4 and sum(usage["counts"]) > 0


def test_smoke_all_methods_then_resume(tiny_vgg, tmp_path):
    out = tmp_path / "all"
    first = cop.main(TINY + ["--out-dir", str(out), "--diversity", "eq4", "--ch-restarts", "1", "--dry-run"])
    assert set(first["accuracy"]) == {"baseline", "pretrain", "coarse_ch", "main_ch", "coarse_cvc", "main_cvc", "ete"}
    for name in ("accuracy_table.md", "coarse_categories.md", "coarse_accuracy_per_category.md"):
        assert (out / name).is_file()
    lines = len((out / "metrics.jsonl").read_text().splitlines())
    again = cop.main(["--resume", str(out)])  # every stage is finished: nothing is trained again
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
