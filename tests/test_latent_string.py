"""Tests of latent_string.py: string decoding and the exact-match lookup, the prefix tree, Eq. 5
against a direct computation, the frozen extractor, Table I parameter counts, a planted-code
recovery, and a smoke run on tiny shapes data (with resume)."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import latent_string as ls


def test_bits_to_int_and_code_strings():
    bits = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]])
    expected = [int("".join(map(str, row)), 2) for row in bits.tolist()]
    assert ls.bits_to_int(bits).tolist() == expected
    assert [ls.code_string(r) for r in bits] == ["000", "011", "101", "111"]


def test_lookup_exact_match_rule_duplicates_and_unknown_strings():
    # Classes 0..3; classes 2 and 3 share the string 10 (a duplicate), 11 belongs to no class.
    code_bits = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 0]])
    assert ls.duplicate_groups(code_bits) == [[2, 3]]
    table = ls.lookup_table(code_bits)
    assert table.tolist() == [0, 1, ls.AMBIGUOUS, ls.NO_MATCH]
    pred = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 0], [1, 1], [0, 1]])
    labels = torch.tensor([0, 1, 2, 3, 3, 1])
    m = ls.string_metrics(pred, labels, code_bits)
    # The same numbers with explicit loops.
    exact = [all(int(pred[n, i]) == int(code_bits[labels[n], i]) for i in range(2)) for n in range(len(labels))]
    assert m["exact_match_acc"] == pytest.approx(100 * sum(exact) / len(exact))  # 0, 2, 3, 5 -> 4/6
    assert m["exact_match_acc"] == pytest.approx(100 * 4 / 6)
    assert m["lookup_acc"] == pytest.approx(100 * 2 / 6)  # the shared string 10 never counts under lookup
    assert m["ambiguous_rate"] == pytest.approx(100 * 2 / 6)
    assert m["no_match_rate"] == pytest.approx(100 * 1 / 6)
    per_bit = [100 * sum(int(pred[n, i]) == int(code_bits[labels[n], i]) for n in range(6)) / 6 for i in range(2)]
    assert m["per_bit_acc"] == pytest.approx(per_bit)
    assert m["prefix_acc"][0] == pytest.approx(per_bit[0])
    assert m["prefix_acc"][1] == pytest.approx(m["exact_match_acc"])


def test_prefix_tree_of_a_known_code():
    code_bits = torch.tensor([[0, 0], [0, 1], [1, 1], [1, 1]])
    expected = "\n".join(
        [
            "(root)",
            "├── 0",
            "│   ├── 00  cat",
            "│   └── 01  dog",
            "└── 1",
            "    └── 11  car, truck   <-- DUPLICATE: one string, several classes",
        ]
    )
    assert ls.prefix_tree(code_bits, ["cat", "dog", "car", "truck"]) == expected


def test_hierarchy_prefix_agreement_on_a_code_that_follows_the_hierarchy():
    hierarchy = common.hierarchy_from_json({"a": ["w", "x"], "b": ["y", "z"]}, ["w", "x", "y", "z"])
    code_bits = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    result = ls.hierarchy_prefix_agreement(code_bits, hierarchy)["coarse"]
    assert result == {"same_parent_mean_lcp": 1.0, "different_parent_mean_lcp": 0.0}


def test_class2str_gives_one_distribution_per_bit_and_random_code_is_one_to_one():
    class2str = ls.Class2Str(num_classes=6, hidden=32, bits=3)
    q = class2str(torch.eye(6))
    assert q.shape == (6, 3, 2)
    assert torch.allclose(q.sum(-1), torch.ones(6, 3))
    codes = ls.random_code(20, 5, seed=3)
    assert codes.shape == (20, 5) and set(codes.unique().tolist()) <= {0, 1}
    assert ls.duplicate_groups(codes) == []
    fixed = ls.FixedCode(codes)(torch.eye(20))
    assert torch.equal(fixed.argmax(-1), codes)


def lstm_cell_copy(lstm):
    """An nn.LSTMCell with the weights of a one-layer nn.LSTM (an independent implementation)."""
    cell = torch.nn.LSTMCell(lstm.input_size, lstm.hidden_size)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(lstm, name + "_l0"))
    return cell


def test_eq5_loss_against_a_direct_computation():
    torch.manual_seed(0)
    C, D, L, B = 5, 7, 3, 4
    stage = ls.make_lh_stage(D, C, L, (6, 4), 9)
    feats, labels = torch.randn(B, D), torch.tensor([0, 3, 4, 3])
    alpha, beta, gamma, delta, mu = 0.7, 1.3, 0.2, 0.01, 0.8
    loss, stats = ls.eq5_loss(
        stage, feats, labels, alpha=alpha, beta=beta, gamma=gamma, delta=delta, mu=mu, code_input="soft"
    )

    # Direct: nn.LSTMCell copies of the fused layers run step by step, one sample at a time, loops.
    cells = [lstm_cell_copy(m) for m in stage.classifier.layers]
    total = 0.0
    for n in range(B):
        x = feats[n : n + 1]
        state = [(torch.zeros(1, 6), torch.zeros(1, 6)), (torch.zeros(1, 4), torch.zeros(1, 4))]
        p = []
        for _ in range(L):
            h = x
            for k, cell in enumerate(cells):
                state[k] = cell(h, state[k])
                h = state[k][0]
            p.append(F.softmax(stage.classifier.out(h), -1)[0])
        one_hot = F.one_hot(labels[n : n + 1], C).float()
        q = stage.class2str(one_hot)[0]  # L x 2
        l_prime = F.softmax(stage.str2class(q[None]), -1)[0]
        h_label = -math.log(l_prime[labels[n]].item())
        structured = sum(
            mu ** (i + 1) * -sum(q[i, b].item() * math.log(p[i][b].item()) for b in range(2)) for i in range(L)
        )
        bias = sum(q[i, 0].item() ** 2 + q[i, 1].item() ** 2 for i in range(L))
        total += alpha * h_label + beta * structured - gamma * bias
    l2 = sum((w**2).sum().item() for name, w in stage.named_parameters() if "bias" not in name)
    direct = total / B + delta * l2
    assert loss.item() == pytest.approx(direct, rel=1e-5)
    assert stats["l2"].item() == pytest.approx(l2, rel=1e-6)


def test_hard_code_input_is_the_argmax_string_with_a_straight_through_gradient():
    torch.manual_seed(0)
    C, D, L = 5, 7, 3
    stage = ls.make_lh_stage(D, C, L, (6,), 9)
    feats, labels = torch.randn(4, D), torch.tensor([0, 3, 4, 3])
    _, stats = ls.eq5_loss(stage, feats, labels, alpha=1, beta=1, gamma=0.1, delta=0, mu=0.8, code_input="hard")
    q = stage.class2str(F.one_hot(labels, C).float())
    expected = F.cross_entropy(stage.str2class(F.one_hot(q.argmax(-1), 2).float()), labels)
    assert stats["label_ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    stage.zero_grad()
    loss, _ = ls.eq5_loss(stage, feats, labels, alpha=1, beta=0, gamma=0, delta=0, mu=0.8, code_input="hard")
    loss.backward()  # only H(l, l'): Class2Str gets a gradient through the straight-through estimator
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.class2str.parameters())


@pytest.mark.parametrize("input_proj,hidden", [(False, (7, 5)), (True, (6, 6)), (True, (4,))])
def test_fused_lstm_gives_the_strings_of_the_step_loop(input_proj, hidden):
    torch.manual_seed(1)
    clf = ls.LHClassifier(12, hidden, bits=6, input_proj=input_proj)
    x = torch.randn(33, 12)
    with torch.no_grad():
        fused, steps = clf(x), clf.forward_steps(x)
        cells = [lstm_cell_copy(m) for m in clf.layers]  # a third, independent implementation
        h0 = clf.proj(x) if input_proj else x
        state = [(torch.zeros(33, c.hidden_size), torch.zeros(33, c.hidden_size)) for c in cells]
        ref = []
        for _ in range(6):
            h = h0
            for k, cell in enumerate(cells):
                state[k] = cell(h, state[k])
                h = state[k][0]
            ref.append(clf.out(h))
        ref = torch.stack(ref, 1).log_softmax(-1)
    assert fused.shape == (33, 6, 2)
    assert torch.allclose(fused, steps, atol=1e-5) and torch.allclose(fused, ref, atol=1e-5)
    assert torch.equal(fused.argmax(-1), steps.argmax(-1)) and torch.equal(fused.argmax(-1), ref.argmax(-1))


def test_repair_code_makes_a_planted_code_one_to_one_and_keeps_subtrees():
    code_bits = torch.tensor([[0, 0, 0], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 0], [0, 1, 0]])
    confidence = torch.tensor([0.9, 0.6, 0.99, 0.95, 0.7, 0.8])
    q = torch.stack([confidence, 1 - confidence], -1)[:, None, :].expand(6, 3, 2)
    repaired, moves = ls.repair_code(code_bits, q)
    # The most confident class of each group keeps its string; 5 (0.8) moves first to 011 (common
    # prefix 01), then 4 to 110 (no common prefix left; one bit away), then 1 to 100 (one bit away).
    assert [ls.code_string(r) for r in repaired] == ["000", "100", "001", "010", "110", "011"]
    assert moves == [(5, "010", "011"), (4, "010", "110"), (1, "000", "100")]
    assert ls.duplicate_groups(repaired) == []
    with pytest.raises(ValueError):
        ls.repair_code(torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2, 2))


def test_frozen_feature_extractor_gets_no_gradient():
    torch.manual_seed(0)
    base = ls.freeze(ls.LeNetMNIST(num_classes=4, in_channels=1))
    stage = ls.make_lh_stage(3136, 4, 2, (5,), 8)
    x, y = torch.randn(3, 1, 28, 28), torch.tensor([0, 1, 3])
    loss, _ = ls.eq5_loss(stage, base.features(x), y, alpha=1, beta=1, gamma=0.1, delta=1e-4, mu=0.8)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())
    assert not base.training
    for module in (stage.classifier, stage.class2str, stage.str2class):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def lstm_params(sizes):
    """PyTorch LSTM layer: 4 gates x (input + hidden weights + two biases); then FC hidden -> 2."""
    total = sum(4 * h * (i + h) + 8 * h for i, h in zip(sizes[:-1], sizes[1:]))
    return total + sizes[-1] * 2 + 2


@pytest.mark.parametrize(
    "dataset,in_features,num_classes", [("mnist", 3136, 10), ("cifar10", 512, 10), ("cifar100", 512, 100)]
)
def test_classifier_parameter_counts_from_table1(dataset, in_features, num_classes):
    hidden, code_hidden = ls.default_lh_sizes(dataset, num_classes)
    bits = ls.default_bits(num_classes)
    stage = ls.make_lh_stage(in_features, num_classes, bits, hidden, code_hidden)
    assert common.count_params(stage.classifier) == lstm_params((in_features,) + hidden)
    # Class2Str C - hidden - 2L and Str2Class 2L - hidden - C.
    assert (
        common.count_params(stage.class2str)
        == num_classes * code_hidden + code_hidden + code_hidden * 2 * bits + 2 * bits
    )
    assert (
        common.count_params(stage.str2class)
        == 2 * bits * code_hidden + code_hidden + code_hidden * num_classes + num_classes
    )
    if dataset == "mnist":  # FC 3136-500-10
        fc = common.count_params(ls.LeNetMNIST(10).head)
        assert fc == 3136 * 500 + 500 + 500 * 10 + 10
    else:  # FC 512-1024-1024-C
        fc = common.count_params(common.VGG(16, num_classes, hidden=(1024, 1024)).head)
        assert fc == 512 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * num_classes + num_classes
    lh = common.count_params(stage.classifier)
    h = ls.reduced_fc_hidden(lh, in_features, num_classes)
    reduced = common.count_params(ls.ReducedFC(in_features, num_classes, h))
    per_unit = in_features + 1 + num_classes
    assert abs(reduced - lh) <= per_unit / 2 + 1  # the closest width to the LH budget
    assert lh < fc


def test_planted_codes_are_learnt_distinct_and_predicted():
    """Well-separated class clusters: Eq. 5 must give distinct strings that the LH classifier
    predicts, with a high exact-match accuracy that the lookup rule confirms."""
    torch.manual_seed(0)
    C, D, bits = 6, 16, 4
    centres = 3 * torch.randn(C, D)
    y = torch.randint(0, C, (1200,))
    x = centres[y] + 0.3 * torch.randn(len(y), D)
    stage = ls.make_lh_stage(D, C, bits, (8,), 32)
    opt = torch.optim.Adam(stage.parameters(), 1e-2)
    loader = ls.FeatureLoader(x[:1000], y[:1000], 100, device="cpu", train=True)
    for _ in range(15):
        for fx, fy in loader:
            opt.zero_grad()
            loss, _ = ls.eq5_loss(stage, fx, fy, alpha=10, beta=1, gamma=0.1, delta=1e-4, mu=0.8)
            loss.backward()
            opt.step()
    codes = ls.class_code_bits(stage.class2str, C, "cpu")
    assert ls.duplicate_groups(codes) == []
    with torch.no_grad():
        pred_bits = stage.classifier(x[1000:]).argmax(-1)
    m = ls.string_metrics(pred_bits, y[1000:], codes)
    assert m["exact_match_acc"] > 90 and m["lookup_acc"] == pytest.approx(m["exact_match_acc"])


def test_bad_inputs_fail_cleanly(tmp_path):
    with pytest.raises(SystemExit):
        ls.get_args(["--bits", "0"])
    with pytest.raises(SystemExit):
        ls.get_args(["--bits-sweep", "3,x"])
    with pytest.raises(SystemExit, match="28x28"):
        ls.main(
            [
                "--backbone",
                "lenet",
                "--image-size",
                "32",
                "--train-size",
                "100",
                "--test-size",
                "50",
                "--device",
                "cpu",
                "--out-dir",
                str(tmp_path / "bad"),
            ]
        )


def test_smoke_tiny_shapes_and_resume(tmp_path):
    out = tmp_path / "run"
    argv = [
        "--train-size",
        "300",
        "--test-size",
        "120",
        "--image-size",
        "28",
        "--backbone",
        "lenet",
        "--epochs",
        "1",
        "--lh-epochs",
        "2",
        "--batch-size",
        "64",
        "--lh-batch-size",
        "64",
        "--bits-sweep",
        "6,7",
        "--hidden-sweep",
        "20,40",
        "--repair-epochs",
        "2",
        "--val-per-class",
        "1",
        "--device",
        "cpu",
        "--out-dir",
        str(out),
    ]
    metrics = ls.main(argv)
    for name in (
        "args.json",
        "metrics.jsonl",
        "metrics.json",
        "class_codes.json",
        "prefix_tree.txt",
        "bits_sweep.tsv",
        "hidden_sweep.tsv",
    ):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_classes"] == 72 and saved["bits"] == 7
    assert len(saved["codes"]) == 72 and all(len(s) == 7 for s in saved["codes"].values())
    assert len(saved["lh"]["per_bit_acc"]) == 7
    # Duplicates in the report are exactly the classes that share a string.
    by_string = {}
    for name, s in saved["codes"].items():
        by_string.setdefault(s, []).append(name)
    shared = sorted(sorted(v) for v in by_string.values() if len(v) > 1)
    codes_file = json.loads((out / "class_codes.json").read_text())
    assert sorted(sorted(g) for g in codes_file["duplicates"]) == shared
    assert [r["bits"] for r in saved["bits_sweep"]] == [6, 7]
    assert saved["bits_sweep"][0]["n_duplicate_groups"] >= 1  # 64 strings cannot hold 72 classes
    tree = (out / "prefix_tree.txt").read_text()
    assert tree.startswith("(root)") and all(name in tree for name in saved["codes"])
    assert saved["params"]["lh_classifier"] < saved["params"]["fc_classifier"]
    for key in ("fc_test_acc", "lh_test_acc", "reduced_fc_test_acc"):
        assert 0 <= saved[key] <= 100
    # The repair step leaves no shared string when 2^L >= C (here 128 >= 72).
    assert saved["duplicate_class_names"] == [] and saved["lh"]["duplicate_strings"] == []
    assert saved["lh"]["lookup_acc"] == pytest.approx(saved["lh"]["exact_match_acc"])
    assert [r["hidden"] for r in saved["hidden_sweep"]] == [20, 40]
    assert (
        saved["hidden_sweep"][0]["lh_params"]
        < saved["hidden_sweep"][1]["lh_params"]
        == saved["params"]["lh_classifier"]
    )
    for row in saved["bits_sweep"] + saved["hidden_sweep"]:
        assert {"exact_match_acc", "lookup_acc", "val_lookup_acc", "n_duplicate_groups"} <= set(row)
    for key in ("eager_fc_images_per_s", "eager_lh_images_per_s", "eager_fc_batch1_ms", "eager_lh_batch1_ms"):
        assert saved["throughput"][key] > 0
    for model in ("fc", "lh", "reduced_fc", "random_code"):
        hm = saved["hierarchical_metrics"][model]
        for key in ("top1", "top5", "level_acc", "mistake_severity", "hdist@1", "hdist@5", "hf1"):
            assert key in hm, (model, key)
        assert set(hm["level_acc"]) == {"shape", "shape_fill", "fine"}
    assert saved["hierarchical_metrics"]["fc"]["top1"] == pytest.approx(saved["fc_test_acc"])
    for level in saved["hierarchy_prefix_agreement"].values():
        assert 0 <= level["same_parent_mean_lcp"] <= 7
    stages = {json.loads(line)["stage"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    repaired = {s for s in stages if s.endswith("_repaired")}
    assert ("lh_repaired" in repaired) == ("before_repair" in saved["lh"])
    assert repaired <= {"lh_repaired", "lh_hidden20_repaired"}  # never the fixed random code, nor L = 6 < log2 72
    assert stages - repaired == {"base", "lh", "random_code", "reduced_fc", "lh_bits6", "lh_hidden20"}
    # Resume: every stage is finished, so nothing trains again and the results are the same.
    lines = len((out / "metrics.jsonl").read_text().splitlines())
    again = ls.main(["--resume", str(out)])
    assert len((out / "metrics.jsonl").read_text().splitlines()) == lines
    assert again["lh_test_acc"] == pytest.approx(metrics["lh_test_acc"])
    assert again["codes"] == metrics["codes"]


def test_base_from_reuses_an_earlier_runs_base_model_and_refuses_another_split(tmp_path):
    first = tmp_path / "first"
    argv = ["--train-size", "200", "--test-size", "80", "--image-size", "28", "--backbone", "lenet"]
    argv += ["--epochs", "1", "--lh-epochs", "1", "--batch-size", "64", "--lh-batch-size", "64"]
    argv += ["--bits-sweep", "none", "--hidden-sweep", "none", "--repair-epochs", "1", "--val-per-class", "1"]
    argv += ["--device", "cpu"]
    base_run = ls.main([*argv, "--out-dir", str(first)])
    variant = ls.main([*argv, "--alpha", "1", "--base-from", str(first), "--out-dir", str(tmp_path / "variant")])
    # The same frozen extractor and FC: the FC classifier's test accuracy is the first run's.
    assert variant["fc_test_acc"] == pytest.approx(base_run["fc_test_acc"])
    assert variant["base_from"] == str(first.resolve()) and base_run["base_from"] is None
    assert not (tmp_path / "variant" / "base").exists()  # no base model trained
    stages = {json.loads(line)["stage"] for line in (tmp_path / "variant" / "metrics.jsonl").read_text().splitlines()}
    assert "base" not in stages and "lh" in stages
    # Stage 2 is seeded afresh: on the same extractor, the same flags give the first run's stage 2 exactly.
    same = ls.main([*argv, "--base-from", str(first), "--out-dir", str(tmp_path / "same")])
    assert same["codes"] == base_run["codes"] and same["lh_test_acc"] == base_run["lh_test_acc"]
    assert same["random_code"]["codes"] == base_run["random_code"]["codes"]
    assert same["reduced_fc_test_acc"] == base_run["reduced_fc_test_acc"]
    # --lh-seed varies stage 2 alone: accepted with --base-from, another random code.
    reseeded = ls.main([*argv, "--lh-seed", "5", "--base-from", str(first), "--out-dir", str(tmp_path / "seed5")])
    assert reseeded["fc_test_acc"] == pytest.approx(base_run["fc_test_acc"])
    assert reseeded["random_code"]["codes"] != base_run["random_code"]["codes"]
    # The control without recurrence on the same extractor: its own parameter count, every stage trained.
    control = ls.main([*argv, "--lh-head", "mlp", "--base-from", str(first), "--out-dir", str(tmp_path / "mlp")])
    assert control["fc_test_acc"] == pytest.approx(base_run["fc_test_acc"])
    assert (
        abs(control["params"]["lh_classifier"] - base_run["params"]["lh_classifier"])
        < 0.02 * base_run["params"]["lh_classifier"]
    )
    assert 0 <= control["lh_test_acc"] <= 100 and 0 <= control["random_code"]["exact_match_acc"] <= 100
    # Another seed would hold out other validation images, which the base model may have trained on.
    with pytest.raises(SystemExit, match=r"--seed \(0 there, 1 here\)"):
        ls.main([*argv, "--seed", "1", "--base-from", str(first), "--out-dir", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="no args.json"):
        ls.main([*argv, "--base-from", str(tmp_path), "--out-dir", str(tmp_path / "none")])
    # A base checkpoint whose weights do not fit (altered after the run): one line with the reason.
    checkpoint = first / "base" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
    torch.save(state, checkpoint)
    with pytest.raises(SystemExit, match=r"base/checkpoint.pt: does not fit this .*Missing key\(s\)"):
        ls.main([*argv, "--base-from", str(first), "--out-dir", str(tmp_path / "altered")])


def test_stage2_learning_rate_schedules():
    args = argparse.Namespace(lh_lr=1e-3, lh_schedule="constant")
    assert [ls.stage2_lr_at(args, 100)(s) for s in (0, 50, 99)] == [1e-3] * 3
    args.lh_schedule = "step"
    lr_at = ls.stage2_lr_at(args, 100)
    assert [lr_at(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])


@pytest.mark.parametrize("in_features, hidden, bits", [(3136, (10, 10), 4), (512, (40, 40), 7), (512, (20, 20), 4)])
def test_bit_mlp_control_has_the_lstms_parameter_count_and_one_distribution_per_bit(in_features, hidden, bits):
    torch.manual_seed(0)
    lstm = ls.LHClassifier(in_features, hidden, bits)
    stage = ls.make_lh_stage(in_features, 10, bits, hidden, 50, head="mlp")
    assert isinstance(stage.classifier, ls.BitMLP)
    n_lstm, n_mlp = common.count_params(lstm), common.count_params(stage.classifier)
    per_unit = in_features + 1 + 2 * bits  # one more hidden unit costs this many parameters
    assert abs(n_mlp - n_lstm) <= per_unit / 2 + 1
    log_p = stage.classifier(torch.rand(5, in_features))
    assert log_p.shape == (5, bits, 2)
    assert torch.allclose(log_p.exp().sum(-1), torch.ones(5, bits), atol=1e-6)


def test_class_log_scores_sum_the_bit_log_probabilities_of_each_class_code():
    torch.manual_seed(0)
    N, C, L = 40, 6, 3
    log_p = torch.randn(N, L, 2).log_softmax(-1)
    code_bits = ls.random_code(C, L, seed=1)  # 6 of the 8 strings: some argmax strings are no class's
    scores = ls.class_log_scores(log_p, code_bits)
    loop = [[sum(log_p[n, i, code_bits[c, i]].item() for i in range(L)) for c in range(C)] for n in range(N)]
    assert scores.shape == (N, C)
    assert torch.allclose(scores, torch.tensor(loop), atol=1e-6)
    # An image whose most probable string is class c's code has c as its top class score.
    table = ls.lookup_table(code_bits)[ls.bits_to_int(log_p.argmax(-1))]
    hits = table >= 0
    assert 0 < hits.sum() < N
    assert torch.equal(scores[hits].argmax(1), table[hits])


def test_repair_trains_on_from_the_lh_weights_with_the_repaired_code_fixed(tmp_path, monkeypatch):
    torch.manual_seed(0)
    C, D, bits = 8, 6, 3  # 8 classes on 3 bits: every string is needed, so one epoch leaves duplicates
    x, y = torch.randn(64, D), torch.arange(64) % C
    cached = {"train": (x, y), "test": (x[:16], y[:16])}
    args = ls.get_args(["--lh-epochs", "1", "--repair-epochs", "1", "--lh-batch-size", "32", "--device", "cpu"])
    trained = {}  # stage name -> (classifier weights on entry, the stage returned, its weights on return)
    original = ls.train_lh_stage

    def recording(name, stage, *a, **k):
        entry = {key: v.clone() for key, v in stage.classifier.state_dict().items()}
        out = original(name, stage, *a, **k)
        trained[name] = (entry, out, {key: v.clone() for key, v in out.classifier.state_dict().items()})
        return out

    monkeypatch.setattr(ls, "train_lh_stage", recording)
    result, codes, _, stage = ls.train_lh_model(
        "lh", cached, args, tmp_path, "cpu", sizes=(D, C, 8), bits=bits, hidden=(4,)
    )
    assert set(trained) == {"lh", "lh_repaired"} and result["before_repair"]["duplicate_strings"]
    _, first, first_weights = trained["lh"]
    repaired_entry, repaired, _ = trained["lh_repaired"]
    assert stage is repaired and isinstance(stage.class2str, ls.FixedCode)
    # The repaired stage starts from the LH classifier as trained, not from a fresh initialisation.
    assert repaired_entry.keys() == first_weights.keys()
    assert all(torch.equal(repaired_entry[k], first_weights[k]) for k in first_weights)
    # Its fixed code is repair_code's output on the LH stage's code and q.
    with torch.no_grad():
        q = first.class2str(torch.eye(C))
    expected, moves = ls.repair_code(ls.class_code_bits(first.class2str, C, "cpu"), q)
    assert torch.equal(stage.class2str.q_table.argmax(-1), expected) and torch.equal(codes, expected)
    assert result["repair_moves"] == moves and result["duplicate_strings"] == []
