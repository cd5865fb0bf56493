"""Tests of common.hierarchical_metrics: every measure on a hand-built three-level tree with answers
worked out by hand, hierarchical distance and precision against brute force over an explicit
tree of parent pointers, and the edge cases (no mistakes, one level, bad input)."""

import numpy as np
import pytest
import torch

import common

# Two top classes, four middle ones, eight fine ones, unequal branches:
#   A: m0 = {0, 1, 2}, m1 = {3}        B: m2 = {4, 5}, m3 = {6, 7}
TOP = np.array([0, 0, 0, 0, 1, 1, 1, 1])
MID = np.array([0, 0, 0, 1, 2, 2, 3, 3])


def hand_tree():
    names = [["A", "B"], [f"m{i}" for i in range(4)], [f"f{i}" for i in range(8)]]
    return common.Hierarchy(["top", "mid", "fine"], names, [TOP, MID, np.arange(8)])


def hand_case():
    """Five images: (true label, {class: probability}); the top five are distinct, the rest ~0."""
    rows = [
        (0, {0: 0.5, 1: 0.2, 3: 0.15, 4: 0.1, 6: 0.05}),  # right; top-5 heights 0 1 2 3 3
        (3, {2: 0.4, 3: 0.3, 7: 0.15, 0: 0.1, 5: 0.05}),  # 2 for 3: height 2; top-5 2 0 3 2 3
        (5, {4: 0.45, 6: 0.25, 7: 0.2, 5: 0.06, 1: 0.04}),  # 4 for 5: height 1; top-5 1 2 2 0 3
        (7, {1: 0.35, 0: 0.3, 6: 0.2, 5: 0.1, 2: 0.05}),  # 1 for 7: height 3; top-5 3 3 1 2 3
        (6, {6: 0.6, 7: 0.2, 4: 0.1, 3: 0.06, 2: 0.04}),  # right; top-5 0 1 2 3 3
    ]
    probs = torch.full((len(rows), 8), 1e-9)
    for i, (_, row) in enumerate(rows):
        for c, p in row.items():
            probs[i, c] = p
    labels = torch.tensor([label for label, _ in rows])
    return probs.log(), labels


def test_every_measure_by_hand():
    scores, labels = hand_case()
    m = common.hierarchical_metrics(scores, labels, hand_tree())
    # Predictions 0, 2, 4, 1, 6 against 0, 3, 5, 7, 6.
    assert m["top1"] == pytest.approx(40.0)
    assert m["top5"] == pytest.approx(80.0)  # image 3's top five lack class 7
    # Summed probabilities: mid m0 .7 / m0 .5 (true m1) / m2 .51 / m0 .7 (true m3) / m3 .8;
    # top A .85 / A .8 / B .96 / A .7 (true B) / B .9.
    assert m["level_acc"] == pytest.approx({"top": 80.0, "mid": 60.0, "fine": 40.0})
    assert m["mistake_severity"] == pytest.approx((2 + 1 + 3) / 3)
    assert m["hdist@1"] == pytest.approx((0 + 2 + 1 + 3 + 0) / 5)
    assert m["hdist@5"] == pytest.approx((9 + 10 + 8 + 12 + 9) / 25)
    # Ancestor sets of 3 members; shared members per image 3, 1, 2, 0, 3.
    assert m["hprecision"] == pytest.approx(100 * 9 / 15)
    assert m["hrecall"] == pytest.approx(100 * 9 / 15)
    assert m["hf1"] == pytest.approx(100 * 9 / 15)
    assert "consistency" not in m
    # Ancestors of the fine predictions: mid 0 0 2 0 3, top 0 0 1 0 1.
    mid_pred, top_pred = torch.tensor([0, 1, 2, 0, 3]), np.array([0, 0, 1, 1, 1])
    both = common.hierarchical_metrics(scores, labels, hand_tree(), {"mid": mid_pred, "top": top_pred})
    assert both["consistency"] == pytest.approx(60.0)  # image 1 (mid) and image 3 (top) disagree
    top_only = common.hierarchical_metrics(scores, labels, hand_tree(), {"top": top_pred})
    assert top_only["consistency"] == pytest.approx(80.0)
    assert common.level_accuracies(scores, labels, hand_tree()) == m["level_acc"]


def parent_pointers(hierarchy):
    """Explicit tree: node (level, class) -> parent node; None above the coarsest level (the root)."""
    parent_of = {}
    for level in range(hierarchy.n_levels):
        for f in range(hierarchy.num_classes()):
            up = None if level == 0 else (level - 1, int(hierarchy.parents[level - 1][f]))
            parent_of[(level, int(hierarchy.parents[level][f]))] = up
    return parent_of


def path_to_root(parent_of, leaf_node):
    """The leaf, its ancestors, up to (not including) the root."""
    path, node = [], leaf_node
    while node is not None:
        path.append(node)
        node = parent_of[node]
    return path


def lca_height_by_walking(parent_of, n_levels, a, b):
    """Steps from leaf a up to the first node that is also an ancestor of leaf b (the root if none)."""
    above_b = set(path_to_root(parent_of, (n_levels - 1, b)))
    path_a = path_to_root(parent_of, (n_levels - 1, a))
    return next((steps for steps, node in enumerate(path_a) if node in above_b), len(path_a))


def random_tree(rng, sizes):
    """A nested hierarchy with sizes[l] classes at level l (coarsest first), every class used."""
    parents = [np.arange(sizes[-1])]
    for level in range(len(sizes) - 2, -1, -1):
        below = sizes[level + 1]
        up = np.concatenate([np.arange(sizes[level]), rng.integers(0, sizes[level], below - sizes[level])])
        parents.insert(0, rng.permutation(up)[parents[0]])
    names = [[f"l{i}c{c}" for c in range(n)] for i, n in enumerate(sizes)]
    return common.Hierarchy([f"l{i}" for i in range(len(sizes))], names, parents)


@pytest.mark.parametrize("sizes", [(2, 4, 8), (3, 5, 9, 20), (12,)])
def test_hdist_and_hprecision_against_brute_force(sizes):
    rng = np.random.default_rng(sum(sizes))
    tree = hand_tree() if sizes == (2, 4, 8) else random_tree(rng, sizes)
    parent_of = parent_pointers(tree)
    n, c = 60, tree.num_classes()
    scores = torch.as_tensor(rng.normal(size=(n, c)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, c, n))
    scores[:20] += 5 * torch.nn.functional.one_hot(labels[:20], c)  # some right answers too
    m = common.hierarchical_metrics(scores, labels, tree)

    def ancestor_set(f):
        return set(path_to_root(parent_of, (tree.n_levels - 1, f)))

    for key, k in (("hdist@1", 1), ("hdist@5", 5)):
        total = 0
        for i in range(n):
            ranked = sorted(range(c), key=lambda j: -scores[i, j].item())[:k]
            total += sum(lca_height_by_walking(parent_of, tree.n_levels, int(labels[i]), j) for j in ranked)
        assert m[key] == pytest.approx(total / (n * k)), key
    shared = predicted = true = 0
    mistakes = []
    for i in range(n):
        pred = int(scores[i].argmax())
        p_set, t_set = ancestor_set(pred), ancestor_set(int(labels[i]))
        shared, predicted, true = shared + len(p_set & t_set), predicted + len(p_set), true + len(t_set)
        if pred != labels[i]:
            mistakes.append(lca_height_by_walking(parent_of, tree.n_levels, int(labels[i]), pred))
    assert m["hprecision"] == pytest.approx(100 * shared / predicted)
    assert m["hrecall"] == pytest.approx(100 * shared / true)
    assert m["mistake_severity"] == pytest.approx(np.mean(mistakes))
    assert m["top1"] == pytest.approx(100 * (n - len(mistakes)) / n)


def test_mistake_severity_ignores_correct_predictions():
    rng = np.random.default_rng(3)
    tree = hand_tree()
    scores = torch.as_tensor(rng.normal(size=(40, 8)), dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 8, 40))
    scores[:15] += 10 * torch.nn.functional.one_hot(labels[:15], 8)
    before = common.hierarchical_metrics(scores, labels, tree)
    assert before["mistake_severity"] is not None and 0 < before["top1"] < 100
    # Reshuffle the runners-up of every correct image (its true class stays first), and add
    # more correct images: the severity does not move, though hdist@5 does.
    changed = scores.clone()
    right = (scores.argmax(1) == labels).nonzero().flatten()
    for i in right.tolist():
        others = [j for j in range(8) if j != labels[i]]
        changed[i, others] = changed[i, others][torch.as_tensor(rng.permutation(7))]
    extra = 20 * torch.nn.functional.one_hot(labels[right], 8).float() + torch.randn(len(right), 8)
    changed, more_labels = torch.cat([changed, extra]), torch.cat([labels, labels[right]])
    after = common.hierarchical_metrics(changed, more_labels, tree)
    assert after["mistake_severity"] == pytest.approx(before["mistake_severity"])
    assert after["top1"] > before["top1"] and after["hdist@5"] != pytest.approx(before["hdist@5"])


def test_perfect_classifier():
    tree = hand_tree()
    labels = torch.arange(8).repeat(3)
    scores = 10 * torch.nn.functional.one_hot(labels, 8).float()
    level_preds = {"top": TOP[labels.numpy()], "mid": torch.as_tensor(MID)[labels]}
    m = common.hierarchical_metrics(scores, labels, tree, level_preds)
    assert m["top1"] == m["top5"] == 100.0 and set(m["level_acc"].values()) == {100.0}
    assert m["hprecision"] == m["hrecall"] == m["hf1"] == 100.0 and m["consistency"] == 100.0
    assert m["mistake_severity"] is None and m["hdist@1"] == 0.0
    assert m["hdist@5"] > 0  # the four runners-up are other classes


def test_one_level_hierarchy():
    tree = common.Hierarchy(["fine"], [[f"c{i}" for i in range(3)]], [np.arange(3)])
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 2, 2])
    m = common.hierarchical_metrics(scores, labels, tree, {"fine": torch.tensor([0, 1, 0, 0])})
    assert m["top1"] == pytest.approx(50.0) and m["top5"] == 100.0  # top-5 capped at the 3 classes
    assert m["level_acc"] == pytest.approx({"fine": 50.0})
    assert m["mistake_severity"] == 1.0 and m["hdist@1"] == pytest.approx(0.5)
    assert m["hdist@5"] == pytest.approx(2 / 3)  # k = 3: two of the three classes are wrong
    assert m["hprecision"] == m["hrecall"] == m["hf1"] == pytest.approx(50.0)
    assert m["consistency"] == pytest.approx(75.0)  # image 3: argmax 2, the level head says 0


def test_bad_input_fails_with_one_line():
    scores, labels = hand_case()
    tree = hand_tree()
    with pytest.raises(SystemExit, match="not in the hierarchy"):
        common.hierarchical_metrics(scores, labels, tree, {"superclass": labels})
    with pytest.raises(SystemExit, match="level_preds is empty"):
        common.hierarchical_metrics(scores, labels, tree, {})
    with pytest.raises(SystemExit, match="'mid' predictions"):
        common.hierarchical_metrics(scores, labels, tree, {"mid": labels[:2]})
    with pytest.raises(SystemExit, match="expected N x 8"):
        common.hierarchical_metrics(scores[:, :5], labels, tree)
    with pytest.raises(SystemExit, match="labels for"):
        common.hierarchical_metrics(scores, labels[:3], tree)


def test_probabilities_logits_and_log_probabilities_agree():
    rng = np.random.default_rng(5)
    logits = torch.as_tensor(rng.normal(size=(30, 8)) * 2, dtype=torch.float32)
    labels = torch.as_tensor(rng.integers(0, 8, 30))
    level_preds = {"mid": torch.as_tensor(MID)[logits.argmax(1)]}
    from_logits = common.hierarchical_metrics(logits, labels, hand_tree(), level_preds)
    for scores in (logits.softmax(1), logits.log_softmax(1)):
        other = common.hierarchical_metrics(scores, labels, hand_tree(), level_preds)
        assert other.keys() == from_logits.keys()
        for key, value in from_logits.items():
            assert other[key] == pytest.approx(value), key
    # Probabilities soft-maxed once more would flatten the coarse sums and change the hand case's answer.
    probs, labels = hand_case()
    m = common.hierarchical_metrics(probs.exp(), labels, hand_tree())
    assert m["level_acc"] == pytest.approx({"top": 80.0, "mid": 60.0, "fine": 40.0})


def test_ties_rank_the_lower_class_first_for_top1_and_top5_alike():
    scores, labels = torch.zeros(4, 8), torch.tensor([0, 1, 4, 5])  # constant scores: every class ties
    m = common.hierarchical_metrics(scores, labels, hand_tree())
    assert (m["top1"], m["top5"]) == (25.0, 75.0)  # the ranking 0, 1, 2, ...: top-1 class 0, top-5 classes 0-4
    assert common.accuracy(scores, labels) == 25.0
    assert m["hdist@5"] == pytest.approx(common.lca_heights(hand_tree())[:5][:, labels].float().mean().item())
    tied = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    assert common.ranked_classes(tied, 4).tolist() == [[1, 2, 4, 0]]


def test_probability_rows_are_decided_one_by_one():
    """A probability input with one row that misses 1 (a truncated row): the other rows stay as they are."""
    probs, labels = hand_case()
    probs = probs.exp()
    off = torch.full((1, 8), 0.1)  # sums to 0.8: soft-maxed, alone
    m = common.hierarchical_metrics(torch.cat([probs, off]), torch.cat([labels, torch.tensor([0])]), hand_tree())
    alone = common.level_accuracies(off, torch.tensor([0]), hand_tree())
    hand = {"top": 80.0, "mid": 60.0, "fine": 40.0}
    assert m["level_acc"] == pytest.approx({k: (5 * hand[k] + alone[k]) / 6 for k in hand})
