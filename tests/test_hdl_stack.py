"""Tests for hdl_stack.py: center loss and its per-epoch update, head shapes, the CIFAR-100 WordNet
table, the total loss, violation rates, and a smoke run on tiny shapes data."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import hdl_stack

ROOT = Path(__file__).resolve().parents[1]


def tiny_hdl(num_fine=8, level_sizes=(4, 2), hidden=(5, 3)):
    backbone = common.CifarResNet(n=1, num_classes=num_fine)
    return hdl_stack.HDLNet(backbone, num_fine, list(level_sizes), list(hidden))


def test_center_loss_matches_direct_sum():
    g = torch.Generator().manual_seed(0)
    features, centers = torch.randn(10, 7, generator=g), torch.randn(4, 7, generator=g)
    labels = torch.randint(0, 4, (10,), generator=g)
    direct = 0.0
    for i in range(10):  # eq. 1, divided by the batch size
        for d in range(7):
            direct += (features[i, d].item() - centers[labels[i], d].item()) ** 2
    assert hdl_stack.center_loss(features, labels, centers).item() == pytest.approx(direct / 10, rel=1e-5)
    # Features exactly at their centres cost nothing.
    assert hdl_stack.center_loss(centers[labels], labels, centers).item() == pytest.approx(0.0, abs=1e-7)


def test_center_update_is_the_epoch_mean_per_class():
    model = tiny_hdl(num_fine=5)
    dim = model.centers.shape[1]
    g = torch.Generator().manual_seed(1)
    old = torch.randn(5, dim, generator=g)
    model.centers.copy_(old)
    batches = [(torch.randn(6, dim, generator=g), torch.tensor([0, 1, 1, 2, 0, 0])) for _ in range(3)]
    for feats, labels in batches:
        model.accumulate_centers(feats, labels)
    model.update_centers(alpha=1.0)
    all_feats = torch.cat([f for f, _ in batches])
    all_labels = torch.cat([l for _, l in batches])
    for c in range(5):
        rows = [all_feats[i] for i in range(len(all_labels)) if all_labels[i] == c]
        expected = torch.stack(rows).mean(0) if rows else old[c]  # classes 3, 4 unseen: unchanged
        assert torch.allclose(model.centers[c], expected, atol=1e-5), c
    assert model.center_sum.abs().sum() == 0 and model.center_count.sum() == 0  # reset for the next epoch
    # alpha < 1 moves a centre only part of the way; an epoch without class 1 leaves it alone.
    before = model.centers.clone()
    feats = torch.randn(2, dim, generator=g)
    model.accumulate_centers(feats, torch.tensor([0, 0]))
    model.update_centers(alpha=0.5)
    assert torch.allclose(model.centers[0], before[0] + 0.5 * (feats.mean(0) - before[0]), atol=1e-5)
    assert torch.equal(model.centers[1], before[1])


def test_training_step_accumulates_centers_and_fit_updates_them(tmp_path):
    torch.manual_seed(0)
    model = tiny_hdl(num_fine=3, level_sizes=(2,), hidden=(None,))
    x = torch.rand(12, 3, 8, 8)
    fine = torch.tensor([0, 1, 2] * 4)
    coarse = torch.tensor([0, 0, 1] * 4)
    loss_fn = hdl_stack.make_hdl_loss_fn(1.0, 1.0, [1.0])
    model.train()
    loss_fn(model, x, (fine, coarse))
    assert model.center_count.tolist() == [4.0, 4.0, 4.0]
    with torch.no_grad():
        feats = model.backbone.features(x)  # same batch, same BN batch statistics
    for c in range(3):
        assert torch.allclose(model.center_sum[c], feats[fine == c].sum(0), atol=1e-4)


def test_head_shapes_follow_the_paper_stacks():
    levels = [
        hdl_stack.Level(n, [str(i) for i in range(k)], np.zeros(100, dtype=np.int64))
        for n, k in (("category12", 12), ("category6", 6), ("category2", 2))
    ]
    args = hdl_stack.get_args(["--dataset", "cifar100"])
    assert args.heads == "cascade"  # the paper's topology is the default
    hidden = hdl_stack.stack_hidden_sizes("auto", args, levels)
    assert hidden == [100, 10, 4]  # experiment 6: FC 100 then 12, FC 10 then 6, FC 4 then 2
    # Cascade: linear1 reads the fine classifier's 100 outputs, linear2 linear1's 12, linear3 linear2's 6.
    cascade = hdl_stack.HDLNet(hdl_stack.ResNet18(100), 100, [12, 6, 2], hidden, heads="cascade")
    # Parallel: every stack reads the 512 pooled features.
    parallel = hdl_stack.HDLNet(hdl_stack.ResNet18(100), 100, [12, 6, 2], hidden, heads="parallel")
    for model, inputs in ((cascade, (100, 12, 6)), (parallel, (512, 512, 512))):
        for stack, i, (h, n) in zip(model.stacks, inputs, ((100, 12), (10, 6), (4, 2))):
            linears = [m for m in stack if isinstance(m, torch.nn.Linear)]
            assert [(l.in_features, l.out_features) for l in linears] == [(i, h), (h, n)]
            assert isinstance(stack[1], torch.nn.ReLU) and isinstance(stack[-1], torch.nn.Linear)  # no ReLU on outputs
        model.eval()
        features, fine, level_logits = model(torch.rand(2, 3, 32, 32))
        assert features.shape == (2, 512) and fine.shape == (2, 100)
        assert [tuple(l.shape) for l in level_logits] == [(2, 12), (2, 6), (2, 2)]
    # The cascade's level logits are the stacks applied in a chain to the fine logits.
    x = torch.rand(2, 3, 32, 32)
    features, fine, (l1, l2, l3) = cascade(x)
    assert torch.allclose(l1, cascade.stacks[0](fine), atol=1e-6)
    assert torch.allclose(l3, cascade.stacks[2](cascade.stacks[1](l1)), atol=1e-6)
    # Shapes (section 4.1): one linear layer per level, replacing the output layer: 512 -> 6 -> 6 -> 2.
    single = hdl_stack.HDLNet(hdl_stack.ResNet18(72), 72, [6, 6, 2], [None, None, None], fine_head=False)
    assert [(s[0].in_features, s[0].out_features) for s in single.stacks] == [(512, 6), (6, 6), (6, 2)]
    assert all(len(s) == 1 for s in single.stacks)
    single.eval()
    _, fine, level_logits = single(torch.rand(2, 3, 32, 32))
    assert fine is None and [tuple(l.shape) for l in level_logits] == [(2, 6), (2, 6), (2, 2)]
    assert sum(p.numel() for p in single.backbone.head.parameters()) == 0  # no fine classifier left
    with pytest.raises(ValueError, match="heads"):
        hdl_stack.HDLNet(hdl_stack.ResNet18(72), 72, [6], heads="tree")


def test_cascade_passes_gradients_down_the_chain_and_parallel_does_not():
    torch.manual_seed(6)
    x = torch.rand(4, 3, 8, 8)
    for heads, reaches in (("cascade", True), ("parallel", False)):
        model = tiny_hdl(num_fine=8, level_sizes=(4, 3, 2), hidden=(5, None, 3))
        model = hdl_stack.HDLNet(model.backbone, 8, [4, 3, 2], [5, None, 3], heads=heads)
        _, fine, levels = model(x)
        levels[-1].sum().backward()  # only the coarsest level's output
        first, fine_fc = model.stacks[0][0].weight.grad, model.backbone.head.fc.weight.grad
        if reaches:  # 3L's loss trains 2L's and 1L's layers and the fine classifier before them
            assert first is not None and first.abs().sum() > 0
            assert fine_fc is not None and fine_fc.abs().sum() > 0
        else:
            assert first is None and fine_fc is None
        assert model.backbone.stem[0].weight.grad.abs().sum() > 0
    # Without a fine classifier the first level's layer reads the pooled features; the fine loss of the
    # model with one still reaches the backbone through the fine classifier.
    model = hdl_stack.HDLNet(common.CifarResNet(n=1, num_classes=8), 8, [4, 2], heads="cascade")
    _, fine, _ = model(x)
    F.cross_entropy(fine, torch.tensor([0, 1, 2, 3])).backward()
    assert model.backbone.stem[0].weight.grad.abs().sum() > 0 and model.stacks[0][0].weight.grad is None


def test_wen_update_moves_centres_by_alpha_times_the_damped_mean_difference():
    model = tiny_hdl(num_fine=4)
    dim = model.centers.shape[1]
    g = torch.Generator().manual_seed(7)
    old = torch.randn(4, dim, generator=g)
    model.centers.copy_(old)
    feats, labels = torch.randn(5, dim, generator=g), torch.tensor([0, 0, 0, 2, 2])
    model.batch_update_centers(feats, labels, 0.5, "wen")
    for c in range(4):  # Wen et al. eq. 4: delta_c = sum_{y_i = c} (c - x_i) / (1 + n_c); c <- c - alpha delta_c
        rows = [i for i in range(5) if labels[i] == c]
        delta = sum((old[c] - feats[i] for i in rows), torch.zeros(dim)) / (1 + len(rows))
        assert torch.allclose(model.centers[c], old[c] - 0.5 * delta, atol=1e-6), c
    # Unseen classes stay put; a class of n images moves by alpha * n / (1 + n) of its mean difference.
    assert torch.equal(model.centers[1], old[1]) and torch.equal(model.centers[3], old[3])
    mean_diff = feats[:3].mean(0) - old[0]
    assert torch.allclose(model.centers[0] - old[0], 0.5 * 3 / 4 * mean_diff, atol=1e-6)


def test_sgd_update_is_an_sgd_step_on_the_centres():
    model = tiny_hdl(num_fine=4)
    dim = model.centers.shape[1]
    g = torch.Generator().manual_seed(8)
    model.centers.copy_(torch.randn(4, dim, generator=g))
    feats, labels = torch.randn(6, dim, generator=g), torch.tensor([0, 1, 1, 3, 3, 3])
    # Reference: the centres as a parameter, torch's SGD on mean_i 1/2 ||x_i - c_{y_i}||^2.
    centers = torch.nn.Parameter(model.centers.clone())
    opt = torch.optim.SGD([centers], lr=0.3)
    (0.5 * ((feats - centers[labels]) ** 2).sum(1).mean()).backward()
    opt.step()
    model.batch_update_centers(feats, labels, 0.3, "sgd")
    assert torch.allclose(model.centers, centers.detach(), atol=1e-6)
    with pytest.raises(ValueError, match="rule"):
        model.batch_update_centers(feats, labels, 0.3, "adam")


def test_loss_fn_variants_use_old_centres_then_move_them():
    torch.manual_seed(9)
    x, fine, coarse = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 1, 3]), torch.tensor([0, 0, 0, 1])
    for update, features_kind in (("wen", "raw"), ("sgd", "normalized"), ("epoch", "normalized")):
        model = tiny_hdl(num_fine=4, level_sizes=(2,), hidden=(3,)).eval()  # eval: deterministic BN
        model.centers.normal_()
        before = model.centers.clone()
        loss_fn = hdl_stack.make_hdl_loss_fn(
            0.2, 1.0, [1.0], center_update=update, center_alpha=0.5, center_features=features_kind
        )
        loss, stats = loss_fn(model, x, (fine, coarse))
        feats, _, _ = model(x)
        space = feats / feats.norm(dim=1, keepdim=True) if features_kind == "normalized" else feats
        expected = sum(((space[i] - before[fine[i]]) ** 2).sum() for i in range(4)) / 4
        assert stats["center"].item() == pytest.approx(expected.item(), rel=1e-5), update
        if features_kind == "normalized":
            assert torch.allclose(space.norm(dim=1), torch.ones(4), atol=1e-5)
        reference = hdl_stack.HDLNet(model.backbone, 4, [2], [3])
        reference.centers.copy_(before)
        if update == "epoch":  # nothing moves before the end of the epoch; the batch is accumulated
            assert torch.equal(model.centers, before)
            assert torch.allclose(model.center_sum[1], space[1:3].sum(0).detach(), atol=1e-5)
        else:
            reference.batch_update_centers(space.detach(), fine, 0.5, update)
            assert torch.allclose(model.centers, reference.centers, atol=1e-5)
            assert not torch.allclose(model.centers, before)


def test_metrics_hierarchy_from_nested_levels_or_the_dataset_tree():
    a = hdl_stack.Level("A", ["a0", "a1", "a2"], np.array([0, 0, 1, 1, 2, 2]))
    b = hdl_stack.Level("B", ["b0", "b1"], np.array([0, 0, 0, 0, 1, 1]))
    tree, heads = hdl_stack.metrics_hierarchy([a, b], None)  # nested: the levels are the tree
    assert tree.level_names == ["B", "A", "fine"] and heads == {"A": "A", "B": "B"}
    assert np.array_equal(tree.parents[0], b.parent) and np.array_equal(tree.parents[-1], np.arange(6))
    # Perfect predictions: consistency 100; a head that contradicts the fine prediction lowers it.
    scores = torch.eye(6)[[0, 2, 4, 5]] * 5
    labels = torch.tensor([0, 2, 4, 5])
    m = common.hierarchical_metrics(scores, labels, tree, {"A": a.labels(labels), "B": torch.tensor([0, 1, 1, 1])})
    assert m["consistency"] == pytest.approx(75.0)
    # Not nested (shapes-like attributes): the dataset's tree, with the heads that are levels of it.
    c = hdl_stack.Level("C", ["c0", "c1"], np.array([0, 1, 0, 1, 0, 1]))
    assert not hdl_stack.levels_nest([a, c])
    data_tree = common.Hierarchy(["B", "fine"], [["b0", "b1"], list(range(6))], [b.parent, np.arange(6)])
    tree, heads = hdl_stack.metrics_hierarchy([a, c, b], data_tree)
    assert tree is data_tree and heads == {"B": "B"}


def test_majority_errors_by_hand():
    # Train: fine labels 0,0,1,2,2,2 (largest 2); level labels 0,0,0,1,1,1 (tie: bincount argmax takes 0).
    train = (torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1]))
    evaluated = (torch.tensor([2, 2, 0, 1]), torch.tensor([1, 1, 0, 0]))
    errors = hdl_stack.majority_errors(train, evaluated, ["fine", "coarse"])
    assert errors == {"fine": pytest.approx(50.0), "coarse": pytest.approx(50.0)}
    # The category comes from train, not from the evaluated labels: evaluated all 1 -> 100% error.
    errors = hdl_stack.majority_errors((torch.tensor([0, 0, 1]),), (torch.tensor([1, 1, 1, 1]),), ["fine"])
    assert errors == {"fine": pytest.approx(100.0)}


def test_validation_split_is_held_out_of_train_per_class():
    labels = np.array([0] * 10 + [1] * 20 + [2] * 3)
    val, train = hdl_stack.validation_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(val, train)) == 0 and len(val) + len(train) == len(labels)
    assert np.bincount(labels[val]).tolist() == [2, 4, 1]  # round(0.2 * n_c) per class
    again, _ = hdl_stack.validation_split(labels, 0.2, seed=0)
    assert np.array_equal(val, again)
    with pytest.raises(SystemExit, match="empty"):
        hdl_stack.validation_split(np.array([0, 1]), 0.1, seed=0)


def test_fine_scores_from_levels_pick_the_heads_combination():
    a = hdl_stack.Level("A", ["a0", "a1", "a2"], np.array([0, 0, 1, 1, 2, 2]))
    b = hdl_stack.Level("B", ["b0", "b1"], np.array([0, 1, 0, 1, 0, 1]))
    assert hdl_stack.levels_identify_fine_classes([a, b])
    assert not hdl_stack.levels_identify_fine_classes([a])
    g = torch.Generator().manual_seed(10)
    la, lb = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    scores = hdl_stack.fine_scores_from_levels([la, lb], [a, b])
    pred = scores.argmax(1)
    assert torch.equal(a.labels(pred), la.argmax(1)) and torch.equal(b.labels(pred), lb.argmax(1))
    assert torch.allclose(scores.exp().sum(1), torch.ones(7), atol=1e-5)  # a distribution over the 6 classes


def test_wordnet_tables_cover_cifar100_once_with_a_consistent_chain():
    for reading, table in hdl_stack.WORDNET_TABLES.items():
        names = [row[0] for row in table]
        assert sorted(names) == sorted(hdl_stack.CIFAR100_CLASSES) and len(set(names)) == 100, reading
        p12, p6, p2 = hdl_stack.check_wordnet_table(table)
        assert len(p12) == len(p6) == len(p2) == 100
        # Independent chain check: every 12-category has one 6-parent, every 6-category one 2-parent.
        for child, parent in ((p12, p6), (p6, p2)):
            for c in np.unique(child):
                assert len(np.unique(parent[child == c])) == 1, reading
        # Indices point at the right names.
        i = hdl_stack.CIFAR100_CLASSES.index("man")
        assert (hdl_stack.LEVEL12_NAMES[p12[i]], hdl_stack.LEVEL6_NAMES[p6[i]], hdl_stack.LEVEL2_NAMES[p2[i]]) == (
            "person",
            "causal agent",
            "physical entity",
        )
    # The check catches broken tables.
    table = hdl_stack.WORDNET_TABLES["first-sense"]
    bad_chain = [row if row[0] != "bear" else ("bear", "whole", "matter", "physical entity") for row in table]
    with pytest.raises(ValueError, match="inconsistent parent chain"):
        hdl_stack.check_wordnet_table(bad_chain)
    with pytest.raises(ValueError, match="more than once"):
        hdl_stack.check_wordnet_table(table + [table[0]])
    with pytest.raises(ValueError, match="missing"):
        hdl_stack.check_wordnet_table(table[1:])
    with pytest.raises(ValueError, match="not one of"):
        hdl_stack.check_wordnet_table([("apple", "fruit", "matter", "physical entity")] + table[1:])


def test_default_wordnet_table_fills_the_papers_12_6_2_categories():
    """Issue 29: the paper extracted {12, 6, 2} classes per layer; the default reading has a class in
    every category (the fixed-synset reading leaves 4 of the 12 empty)."""
    assert hdl_stack.get_args(["--dataset", "cifar100"]).levels == hdl_stack.DEFAULT_LEVELS == "first-sense"
    default = hdl_stack.WORDNET_TABLES[hdl_stack.DEFAULT_LEVELS]
    assert hdl_stack.empty_categories(default) == [[], [], []]
    p12, p6, p2 = hdl_stack.check_wordnet_table(default)
    assert [len(np.unique(p)) for p in (p12, p6, p2)] == [12, 6, 2]
    fixed = hdl_stack.WORDNET_TABLES["fixed-synset"]
    assert hdl_stack.empty_categories(fixed) == [["arrangement", "substance", "part", "location"], [], []]
    # The counts of classes that move between the readings: 18 / 17 / 1.
    moved = [sum(a[c] != b[c] for a, b in zip(default, fixed)) for c in (1, 2, 3)]
    assert moved == [18, 17, 1]
    rows = {row[0]: row[1:] for row in default}
    assert rows["table"][0] == "arrangement" and rows["lawn_mower"][0] == "location" and rows["palm_tree"][0] == "part"
    assert rows["beaver"][0] == rows["maple_tree"][0] == "substance"


def test_moved_classes_doc_lists_exactly_the_classes_that_differ():
    doc = (ROOT / "docs" / "hdl_cifar100_levels.md").read_text()
    listed = [line.split("|")[1].strip() for line in doc.splitlines() if line.startswith("| ") and " > " in line]
    first, fixed = hdl_stack.WORDNET_TABLES["first-sense"], hdl_stack.WORDNET_TABLES["fixed-synset"]
    assert listed == [a[0] for a, b in zip(first, fixed) if a != b]
    assert "18 classes move between the readings (18 at the 12-category level, 17 at" in doc


def load_wordnet_tool():
    spec = importlib.util.spec_from_file_location(
        "derive_cifar100_wordnet", ROOT / "tools" / "derive_cifar100_wordnet.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_first_sense_route_takes_index_nouns_first_sense_of_the_first_word(tmp_path):
    tool = load_wordnet_tool()
    # index.noun: lemma pos synset_cnt p_cnt [ptr...] sense_cnt tagsense_cnt offsets (most frequent first).
    (tmp_path / "index.noun").write_text(
        "  1 license header\nlawn n 1 1 @ 1 1 08591592  \ntable n 2 2 @ ~ 2 1 08266235 04379243  \n"
    )
    assert tool.parse_index_noun(tmp_path / "index.noun") == {"lawn": ["08591592"], "table": ["08266235", "04379243"]}
    index = {name.split("_")[0]: [f"{i:08d}", "99999999"] for i, name in enumerate(tool.CIFAR100)}
    rows = {row[0]: row for row in tool.class_synsets("first-sense", index)}
    assert rows["lawn_mower"][1:3] == ("lawn", index["lawn"][0]) and rows["table"][2] == index["table"][0]
    fixed = {row[0]: row for row in tool.class_synsets("fixed-synset", index)}
    assert fixed["table"][2] == "04379243" and fixed["skunk"][2] == "02445715"  # the listed synset; skunk fixed


def test_wordnet_tool_rewrites_only_the_block_between_the_markers():
    tool = load_wordnet_tool()
    text = f"a = 1\n{tool.BEGIN_MARKER}\nOLD = 1\n{tool.END_MARKER}\n\nmain()\n"
    block = f"{tool.BEGIN_MARKER}\nNEW = 2\n{tool.END_MARKER}\n"
    assert tool.replace_block(text, block) == f"a = 1\n{block}\nmain()\n"
    for broken in ("a = 1\n", f"{tool.END_MARKER}\n{tool.BEGIN_MARKER}\n", text + tool.END_MARKER + "\n"):
        with pytest.raises(ValueError):
            tool.replace_block(broken, block)


def test_hdl_stack_imports_no_project_module_but_common():
    """Users copy hdl_stack.py plus common.py: the WordNet tables live in the script itself."""
    import ast

    tree = ast.parse((ROOT / "hdl_stack.py").read_text())
    imported = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.module}
    local = {p.stem for p in ROOT.glob("*.py")}
    assert imported & local == {"common"}


@pytest.mark.skipif(
    not Path("/usr/share/wordnet/data.noun").exists(), reason="WordNet 3.0 (wordnet-base) not installed"
)
def test_shipped_tables_are_the_tools_derivation_from_wordnet():
    tool = load_wordnet_tool()
    wordnet = Path("/usr/share/wordnet")
    synsets, index = tool.parse_data_noun(wordnet / "data.noun"), tool.parse_index_noun(wordnet / "index.noun")
    derived = {reading: tool.derive(synsets, index, reading) for reading in tool.READINGS}
    script = (ROOT / "hdl_stack.py").read_text()
    start, end = tool.generated_block(script)
    assert tool.render_block(synsets, derived) == script[start:end]
    assert script[end:] == '\n\nif __name__ == "__main__":\n    main()\n'  # the block ends the file, above the entry
    assert tool.render_moves(synsets, derived) == (ROOT / "docs" / "hdl_cifar100_levels.md").read_text()


def test_total_loss_is_the_weighted_sum_of_its_parts():
    g = torch.Generator().manual_seed(2)
    n, dim = 9, 6
    features, centers = torch.randn(n, dim, generator=g), torch.randn(5, dim, generator=g)
    fine_logits = torch.randn(n, 5, generator=g)
    level_logits = [torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g)]
    labels = (
        torch.randint(0, 5, (n,), generator=g),
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 2, (n,), generator=g),
    )
    total, parts = hdl_stack.hdl_loss(features, fine_logits, level_logits, labels, centers, 0.3, 0.7, [0.5, 2.0])

    def ce(logits, y):  # -log softmax by hand, averaged over the batch
        return sum(-(logits[i, y[i]] - torch.log(torch.exp(logits[i]).sum())) for i in range(len(y))) / len(y)

    expected = {
        "center": sum(((features[i] - centers[labels[0][i]]) ** 2).sum() for i in range(n)) / n,
        "ce_fine": ce(fine_logits, labels[0]),
        "ce_1L": ce(level_logits[0], labels[1]),
        "ce_2L": ce(level_logits[1], labels[2]),
    }
    assert set(parts) == set(expected)
    for k in expected:
        assert parts[k].item() == pytest.approx(expected[k].item(), rel=1e-5), k
    weighted = 0.3 * expected["center"] + 0.7 * expected["ce_fine"] + 0.5 * expected["ce_1L"] + 2.0 * expected["ce_2L"]
    assert total.item() == pytest.approx(weighted.item(), rel=1e-5)


def test_loss_fn_total_matches_model_outputs():
    torch.manual_seed(3)
    model = tiny_hdl(num_fine=4, level_sizes=(2,), hidden=(3,)).eval()  # eval: deterministic BN
    x, fine, coarse = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 1, 1])
    model.centers.normal_()
    centers = model.centers.clone()
    loss, stats = hdl_stack.make_hdl_loss_fn(1.0, 1.0, [1.0])(model, x, (fine, coarse))
    feats, fine_logits, (coarse_logits,) = model(x)
    expected = (
        hdl_stack.center_loss(feats, fine, centers)
        + F.cross_entropy(fine_logits, fine)
        + F.cross_entropy(coarse_logits, coarse)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats["correct"].item() == (fine_logits.argmax(1) == fine).sum().item()


def test_summed_level_scores_are_probabilities_grouped_by_parent():
    g = torch.Generator().manual_seed(4)
    logits, parent = torch.randn(6, 5, generator=g), np.array([1, 0, 1, 2, 0])
    scores = hdl_stack.summed_level_scores(logits, parent, 3)
    assert torch.allclose(scores.sum(1), torch.ones(6), atol=1e-6)
    probs = logits.softmax(1)
    for c in range(3):
        assert torch.allclose(scores[:, c], sum(probs[:, f] for f in range(5) if parent[f] == c), atol=1e-6)


def test_violation_rates_against_explicit_loops():
    # 6 fine classes; level A (3 classes) and level B (2 classes), a tree: A -> B.
    a = hdl_stack.Level("A", ["a0", "a1", "a2"], np.array([0, 0, 1, 1, 2, 2]))
    b = hdl_stack.Level("B", ["b0", "b1"], np.array([0, 0, 0, 0, 1, 1]))
    g = torch.Generator().manual_seed(5)
    fine = torch.randint(0, 6, (200,), generator=g)
    pa, pb = torch.randint(0, 3, (200,), generator=g), torch.randint(0, 2, (200,), generator=g)
    rates = hdl_stack.violation_rates(fine, [pa, pb], [a, b])
    valid = {(a.parent[f], b.parent[f]) for f in range(6)}
    with_fine = sum(int(pa[i] != a.parent[fine[i]] or pb[i] != b.parent[fine[i]]) for i in range(200)) / 200
    levels_only = sum(int((pa[i].item(), pb[i].item()) not in valid) for i in range(200)) / 200
    assert rates["with_fine"] == pytest.approx(with_fine) and rates["levels_only"] == pytest.approx(levels_only)
    assert 0 < levels_only < with_fine < 1
    # Predictions that follow the predicted fine class never violate.
    clean = hdl_stack.violation_rates(fine, [a.labels(fine), b.labels(fine)], [a, b])
    assert clean == {"with_fine": 0.0, "levels_only": 0.0}


def test_shapes_levels_are_the_three_questions():
    args = hdl_stack.get_args(["--train-size", "80", "--test-size", "40", "--image-size", "16"])
    data = common.load_data(args)
    levels = hdl_stack.make_levels(data, args)  # fails if the per-image labels disagree
    assert [(l.name, l.num_classes) for l in levels] == [("fill", 6), ("outline", 6), ("shape", 2)]
    assert np.array_equal(levels[2].parent, data.hierarchy.parents[0])  # shape = the hierarchy's top level
    assert torch.equal(levels[0].labels(data.train.labels), data.train.extra["fill"])


def test_smoke_tiny_shapes_baseline_and_hdl(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "--device",
        "cpu",
        "--train-size",
        "96",
        "--test-size",
        "48",
        "--image-size",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "48",
        "--out-dir",
        str(out),
    ]
    results = hdl_stack.main(argv)
    for name in ("args.json", "metrics.jsonl", "metrics.json", "levels.json"):
        assert (out / name).is_file(), name
    assert not (out / "table3.md").exists()  # the tables beside the paper's: tools/results_table.py --run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [l["num_classes"] for l in metrics["levels"]] == [6, 6, 2]
    for level in ("fill", "outline", "shape"):
        assert 0 <= metrics["hdl"]["level_error"][level] <= 100
        assert 0 <= metrics["baseline"]["summed_fine_level_error"][level] <= 100
    assert 0 <= metrics["hdl"]["violation_rate"]["with_fine"] <= 100
    assert metrics["paper"]["level_accuracy"] == {"fill": 100.0, "outline": 100.0, "shape": 100.0}
    assert metrics["eval_split"] == "test" and metrics["hdl_config"]["heads"] == "cascade"
    assert metrics["hdl_config"]["fine_head"] == "off"  # shapes: the level layers replace the output layer
    assert set(metrics["majority_error"]) == {"fine", "fill", "outline", "shape"}
    assert all(0 < v <= 100 for v in metrics["majority_error"].values())
    keys = {"top1", "top5", "level_acc", "mistake_severity", "hdist@1", "hdist@5", "hprecision", "hrecall", "hf1"}
    assert keys <= set(metrics["baseline"]["hierarchical"]) and "consistency" not in metrics["baseline"]["hierarchical"]
    assert keys | {"consistency"} <= set(metrics["hdl"]["hierarchical"])
    assert metrics["hdl"]["hierarchical"]["top1"] == pytest.approx(100 - metrics["hdl"]["fine_error"], abs=1e-4)
    assert metrics["hierarchical_tree"]["heads_checked"] == {"shape": "shape"}
    records = common.read_jsonl(out / "metrics.jsonl")
    assert [(r["stage"], r["epoch"]) for r in records] == [("baseline", 1), ("hdl", 1)]
    assert all(np.isfinite(r["loss"]) for r in records) and "ce_3L" in records[-1] and "center" in records[-1]
    table = load_report().run_tables(out)
    assert "1L fill (6 cls)" in table and "3L shape (2 cls)" in table
    assert "majority category" in table and "Table 4 layout" in table and "violations" in table
    ckpt = common.load_checkpoint(out / "hdl" / "checkpoint.pt")
    assert ckpt["model"]["centers"].abs().sum() > 0  # the per-epoch update ran
    assert ckpt["model"]["center_count"].sum() == 0
    # Resume: both stages are complete, so nothing trains again and the numbers are the same.
    again = hdl_stack.main(["--resume", str(out)])
    assert again["hdl"]["level_error"] == results["hdl"]["level_error"]
    assert len(common.read_jsonl(out / "metrics.jsonl")) == 2


def test_validation_runs_and_the_sweep_table(tmp_path):
    base = ["--device", "cpu", "--train-size", "96", "--test-size", "48", "--image-size", "16", "--epochs", "1"]
    base += ["--batch-size", "32", "--method", "hdl", "--val-fraction", "0.25"]
    for name, extra in (("a", ["--lambda-center", "0.01", "--center-update", "wen"]), ("b", ["--heads", "parallel"])):
        hdl_stack.main(base + ["--out-dir", str(tmp_path / "sweep" / name)] + extra)
    metrics = json.loads((tmp_path / "sweep" / "a" / "metrics.json").read_text())
    assert metrics["eval_split"] == "val" and metrics["eval_size"] + metrics["train_size"] == 96
    records = common.read_jsonl(tmp_path / "sweep" / "a" / "metrics.jsonl")
    assert "val_fine_acc" in records[0] and "val_acc_outline" in records[0]  # validation every epoch
    report = load_report()
    report.main(["--sweep-table", str(tmp_path / "sweep")])
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    assert sorted((r["variant"], r["lambda0"]) for r in rows) == [
        ("cascade/wen/raw/a0.5", 0.01),
        ("parallel/epoch/raw/a1", 1.0),
    ]
    assert "majority category" in (tmp_path / "sweep" / "sweep.md").read_text()
    # A run evaluated on the test set is refused: nothing is selected on test.
    (tmp_path / "sweep" / "c").mkdir()
    (tmp_path / "sweep" / "c" / "metrics.json").write_text(json.dumps(dict(metrics, eval_split="test")))
    with pytest.raises(SystemExit, match="test set"):
        report.main(["--sweep-table", str(tmp_path / "sweep")])


def test_bad_flags_fail_with_one_line(tmp_path):
    base = ["--device", "cpu", "--train-size", "40", "--test-size", "20", "--image-size", "16", "--force"]
    with pytest.raises(SystemExit, match="--lambda-levels"):
        hdl_stack.main(base + ["--out-dir", str(tmp_path / "a"), "--lambda-levels", "1", "2"])
    with pytest.raises(SystemExit, match="--stack-hidden"):
        hdl_stack.main(base + ["--out-dir", str(tmp_path / "b"), "--stack-hidden", "4,2"])
    with pytest.raises(SystemExit):
        hdl_stack.get_args(["--center-alpha", "0"])
    with pytest.raises(SystemExit):
        hdl_stack.get_args(["--center-update", "wen", "--center-alpha", "1.5"])
    with pytest.raises(SystemExit):
        hdl_stack.get_args(["--val-fraction", "1"])
    assert hdl_stack.get_args(["--center-update", "wen"]).center_alpha == 0.5
    # --stem auto: the 3x3 stem on CIFAR (the README's stem test picked it for Table 3), the 7x7 elsewhere.
    stems = {d: hdl_stack.get_args(["--dataset", d]).stem for d in ("cifar100", "cifar10", "shapes")}
    assert stems == {"cifar100": "cifar", "cifar10": "cifar", "shapes": "imagenet"}
    assert hdl_stack.get_args(["--dataset", "cifar100", "--stem", "imagenet"]).stem == "imagenet"
    # A CIFAR run from before --stem (its args.json has none) trained the 7x7, and resumes with it.
    saved = {**vars(hdl_stack.get_args(["--dataset", "cifar100"])), "script": "hdl_stack", "resume": None}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "args.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "stem"}))
    assert hdl_stack.get_args(["--resume", str(tmp_path / "old")]).stem == "imagenet"
    (tmp_path / "old" / "args.json").write_text(json.dumps(saved))  # recorded: kept
    assert hdl_stack.get_args(["--resume", str(tmp_path / "old")]).stem == "cifar"
    assert hdl_stack.get_args(["--center-update", "sgd", "--center-alpha", "2"]).center_alpha == 2.0
    with pytest.raises(SystemExit, match="--fine-head off"):  # shapes' first level alone does not name the class
        hierarchy = tmp_path / "by_shape.json"  # one level (shape) above the 72 classes
        fine = common.shapes_hierarchy().class_names[-1]
        hierarchy.write_text(json.dumps({"triangle": fine[:36], "square": fine[36:]}))
        hdl_stack.main(base + ["--out-dir", str(tmp_path / "c"), "--fine-head", "off", "--hierarchy", str(hierarchy)])


def test_cifar100_levels_come_from_the_wordnet_table_the_flag_picks():
    names = hdl_stack.CIFAR100_CLASSES
    hierarchy = common.Hierarchy(["fine"], [names], [np.arange(100)])
    split = common.Split(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([0, 1]))
    data = common.Data("cifar100", split, split, hierarchy, (0.0,) * 3, (1.0,) * 3)
    for argv, reading in (([], "first-sense"), (["--levels", "fixed-synset"], "fixed-synset")):
        args = hdl_stack.get_args(["--dataset", "cifar100", *argv])
        levels = hdl_stack.make_levels(data, args)
        assert [(l.name, l.num_classes) for l in levels] == [("category12", 12), ("category6", 6), ("category2", 2)]
        rows = {row[0]: row for row in hdl_stack.WORDNET_TABLES[reading]}
        for f in range(100):
            for level, column in zip(levels, (1, 2, 3)):
                assert level.class_names[level.parent[f]] == rows[names[f]][column]
        used = [len(np.unique(level.parent)) for level in levels]
        assert used == ([12, 6, 2] if reading == "first-sense" else [8, 6, 2]), reading
    # table (84) and trout (91) are where the readings part: the data table vs the furniture, the fish's flesh.
    first = hdl_stack.make_levels(data, hdl_stack.get_args(["--dataset", "cifar100"]))
    fixed = hdl_stack.make_levels(data, hdl_stack.get_args(["--dataset", "cifar100", "--levels", "fixed-synset"]))
    assert [first[0].class_names[first[0].parent[f]] for f in (84, 91)] == ["arrangement", "solid"]
    assert [fixed[0].class_names[fixed[0].parent[f]] for f in (84, 91)] == ["whole", "whole"]
    with pytest.raises(SystemExit):
        hdl_stack.get_args(["--levels", "nbdt"])


def test_cifar100_defaults_are_the_papers_table3_setting():
    """Experiment 6 / eq. 4: lambdas 1, centres updated after each epoch, raw pooled features, Adam lr 0.001
    (constant), 800 epochs, crop + flip, batch 64, no normalisation, the cascade with 100 / 10 / 4 hidden."""
    args = hdl_stack.get_args(["--dataset", "cifar100"])
    assert (args.lambda_center, args.lambda_fine, args.lambda_levels) == (1.0, 1.0, [1.0])
    assert (args.center_update, args.center_alpha, args.center_features) == ("epoch", 1.0, "raw")
    assert (args.lr, args.batch_size, hdl_stack.default_epochs(args.dataset)) == (0.001, 64, 800)
    assert (args.augment, args.normalize, args.heads, args.levels) == ("auto", False, "cascade", "first-sense")
    assert args.arch == "resnet18" and args.val_fraction == 0.0 and args.epochs is None


def test_gpu_queue_runs_table3_at_the_papers_setting_and_the_sweeps_pick_as_ours(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_runs", ROOT / "tools" / "gpu_runs.py")
    gpu_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_runs)
    for name, method in (("hdl_cifar100_baseline_800", "baseline"), ("hdl_cifar100_hdl_800", "hdl")):
        script, *argv = gpu_runs.JOBS[name]
        assert script == "hdl_stack.py"
        args, defaults = hdl_stack.get_args(argv), hdl_stack.get_args(["--dataset", "cifar100"])
        assert args.method == method and args.data_dir == "data" and args.compile  # compiled: same setting, faster
        # Besides the method and the data, only flags a resume may change (how fast, how often checkpointed).
        same = ("method", "data_dir", *common.RESUME_SAFE)
        assert {k: v for k, v in vars(args).items() if k not in same} == {
            k: v for k, v in vars(defaults).items() if k not in same
        }
    assert gpu_runs.hdl_sweep_pick_job(tmp_path / "missing.json") == {}
    (tmp_path / "sweep.json").write_text(json.dumps({"pick": None, "rows": []}))
    assert gpu_runs.hdl_sweep_pick_job(tmp_path / "sweep.json") == {}
    flags = ["--heads", "cascade", "--center-update", "wen", "--lambda-center", "0.005"]
    (tmp_path / "sweep.json").write_text(json.dumps({"pick": {"flags": flags}}))
    job = gpu_runs.hdl_sweep_pick_job(tmp_path / "sweep.json")["hdl_cifar100_sweep_pick_800"]
    assert job == [
        "hdl_stack.py",
        "--dataset",
        "cifar100",
        "--data-dir",
        "data",
        "--compile",
        "--checkpoint-every",
        "25",
        "--method",
        "hdl",
        *flags,
    ]


def test_readme_states_the_sweep_rule_the_table_applies():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert " ".join(load_report().SWEEP_RULE.split()) in readme


def test_the_reports_default_reading_is_the_scripts():
    """A sweep pick's flags name --levels only for a reading other than hdl_stack.py's default."""
    assert load_report().HDL_DEFAULT_LEVELS == hdl_stack.DEFAULT_LEVELS


def test_a_shapes_runs_recorded_paper_accuracies_are_the_reports():
    """metrics.json still records Table 4's shapes accuracies (the golden smoke record holds them); they must
    be the numbers the report holds."""
    assert hdl_stack.PAPER_SHAPES_ACCURACY == load_report().HDL_PAPER_SHAPES_ACCURACY


def load_report():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_stems_are_resnet18_with_the_known_parameter_counts():
    """--stem cifar is the CIFAR codes' ResNet-18 (3x3/1 stem, no pooling: 11,220,132 parameters at 100
    classes); --stem imagenet swaps in the 7x7/2 + max-pool stem (7,680 weights more), same stages."""
    cifar, imagenet = (hdl_stack.ResNet18(100, stem=stem) for stem in ("cifar", "imagenet"))
    assert sum(p.numel() for p in cifar.parameters()) == 11_220_132
    assert sum(p.numel() for p in imagenet.parameters()) - 11_220_132 == 64 * 3 * (7 * 7 - 3 * 3)
    x = torch.zeros(2, 3, 32, 32)
    assert cifar.stem(x).shape[-1] == 32 and imagenet.stem(x).shape[-1] == 8  # the maps the stages start from


def test_level_results_count_planted_errors_and_violations():
    # 6 fine classes; level A (3 categories) and level B (2), each head right except on a planted set of images.
    a = hdl_stack.Level("A", ["a0", "a1", "a2"], np.array([0, 0, 1, 1, 2, 2]))
    b = hdl_stack.Level("B", ["b0", "b1"], np.array([0, 0, 0, 0, 1, 1]))
    y = torch.arange(12) % 6
    fine_pred = y.clone()
    fine_pred[[0, 2, 5, 7]] = torch.tensor([1, 4, 0, 3])  # a sibling, then moves across A and / or B
    pa, pb = a.labels(y).clone(), b.labels(y).clone()
    pa[[1, 4]] = (pa[[1, 4]] + 1) % 3
    pb[[4, 6, 9]] = 1 - pb[[4, 6, 9]]
    fine_logits = 10 * F.one_hot(fine_pred, 6).float()  # summed probabilities follow the predicted fine class
    result = hdl_stack.level_results(
        fine_logits, [5 * F.one_hot(pa, 3).float(), 5 * F.one_hot(pb, 2).float()], y, [a, b]
    )

    def pct(wrong):
        return 100 * sum(bool(w) for w in wrong) / 12

    assert result["fine_error"] == pytest.approx(pct(fine_pred[i] != y[i] for i in range(12)))
    assert result["level_error"] == pytest.approx(
        {"A": pct(pa[i] != a.parent[y[i]] for i in range(12)), "B": pct(pb[i] != b.parent[y[i]] for i in range(12))}
    )
    summed = {l.name: pct(l.parent[fine_pred[i]] != l.parent[y[i]] for i in range(12)) for l in (a, b)}
    assert result["summed_fine_level_error"] == pytest.approx(summed)
    valid = {(a.parent[f], b.parent[f]) for f in range(6)}
    with_fine = pct(pa[i] != a.parent[fine_pred[i]] or pb[i] != b.parent[fine_pred[i]] for i in range(12))
    levels_only = pct((pa[i].item(), pb[i].item()) not in valid for i in range(12))
    assert result["violation_rate"] == pytest.approx({"with_fine": with_fine, "levels_only": levels_only})
    assert 0 < levels_only < with_fine < 100
    # The planted counts (heads: 2 and 3 images wrong; fine: 3 and 2 cross A and B), unlike across levels.
    assert [result["level_error"][k] for k in "AB"] == pytest.approx([100 * 2 / 12, 100 * 3 / 12])
    assert [summed[k] for k in "AB"] == pytest.approx([100 * 3 / 12, 100 * 2 / 12])
    # Without level heads (the baseline): the summed-fine errors alone, no head errors or violations.
    baseline = hdl_stack.level_results(fine_logits, [], y, [a, b])
    assert set(baseline) == {"fine_error", "summed_fine_level_error"}
    assert baseline["summed_fine_level_error"] == pytest.approx(summed)
