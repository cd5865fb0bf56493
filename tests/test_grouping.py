import ast
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import common
import grouping

ROOT = Path(__file__).resolve().parent.parent


def planted_cpm(blocks, n, within=0.05, across=0.002, seed=0):
    """A CPM whose classes are confused within planted blocks, with noise, rows summing to 1."""
    rng = np.random.default_rng(seed)
    cpm = np.full((n, n), across) + rng.uniform(0, across / 4, (n, n))
    for block in blocks:
        cpm[np.ix_(block, block)] = within + rng.uniform(0, within / 10, (len(block), len(block)))
    np.fill_diagonal(cpm, 0)
    np.fill_diagonal(cpm, 1 - cpm.sum(1))
    return cpm


def shuffled_blocks(sizes, seed=0):
    perm = np.random.default_rng(seed).permutation(sum(sizes))
    blocks, start = [], 0
    for s in sizes:
        blocks.append(sorted(perm[start : start + s].tolist()))
        start += s
    return blocks


def reference_grouping(cpm, g_max, p_min):
    """The paper's rule written out with explicit loops, averages recomputed from scratch."""
    n = len(cpm)
    groups = [[c] for c in range(n)]
    while True:
        best, best_pair = -1.0, None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if len(groups[i]) + len(groups[j]) > g_max:
                    continue
                total = 0.0
                for a in groups[i]:
                    for b in groups[j]:
                        total += cpm[a][b] + cpm[b][a]
                proximity = total / (len(groups[i]) * len(groups[j]))
                if proximity > p_min and proximity > best:
                    best, best_pair = proximity, (i, j)
        if best_pair is None:
            break
        i, j = best_pair
        groups[i] = groups[i] + groups[j]
        del groups[j]
    return sorted((sorted(g) for g in groups), key=lambda g: g[0])


def test_planted_blocks_are_recovered():
    blocks = shuffled_blocks([4, 3, 5, 2])
    cpm = planted_cpm(blocks, 14)
    groups = grouping.group_classes(cpm, g_max=50, p_min=0.0075)
    assert sorted(groups) == sorted(blocks)


def test_g_max_is_respected():
    blocks = shuffled_blocks([6, 5], seed=1)
    cpm = planted_cpm(blocks, 11, seed=1)
    groups = grouping.group_classes(cpm, g_max=3, p_min=0.0075)
    assert max(len(g) for g in groups) <= 3
    assert sorted(c for g in groups for c in g) == list(range(11))
    for g in groups:  # the limit splits blocks, it never mixes them
        assert any(set(g) <= set(b) for b in blocks)
    assert len(groups) < 11  # merges still happened


def test_p_min_is_respected():
    blocks = shuffled_blocks([4, 4], seed=2)
    cpm = planted_cpm(blocks, 8, within=0.05, seed=2)
    # Within-block proximity is about 2 x 0.05; a p_min above it allows no merge at all.
    assert grouping.group_classes(cpm, g_max=50, p_min=0.2) == [[c] for c in range(8)]
    # On a random CPM, the grouping stops only when no pair that fits under g_max is closer than p_min.
    rng = np.random.default_rng(3)
    cpm = rng.dirichlet(np.full(12, 0.3), size=12)
    groups = grouping.group_classes(cpm, g_max=4, p_min=0.05)
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            if len(groups[i]) + len(groups[j]) <= 4:
                assert grouping.group_proximity(cpm, groups[i], groups[j]) <= 0.05


@pytest.mark.parametrize("seed,g_max,p_min", [(0, 50, 0.01), (1, 4, 0.02), (2, 3, 0.0)])
def test_matches_a_brute_force_reference(seed, g_max, p_min):
    cpm = np.random.default_rng(seed).dirichlet(np.full(15, 0.5), size=15)
    assert grouping.group_classes(cpm, g_max=g_max, p_min=p_min) == reference_grouping(cpm, g_max, p_min)


def test_recursive_grouping_gives_a_valid_tree():
    # Three super-blocks, each made of two tight sub-blocks of three classes.
    rng = np.random.default_rng(4)
    perm = rng.permutation(18)
    sub_blocks = [sorted(perm[i : i + 3].tolist()) for i in range(0, 18, 3)]
    cpm = np.full((18, 18), 0.001)
    for k in range(0, 6, 2):
        super_block = sub_blocks[k] + sub_blocks[k + 1]
        cpm[np.ix_(super_block, super_block)] = 0.02
    for block in sub_blocks:
        cpm[np.ix_(block, block)] = 0.08
    np.fill_diagonal(cpm, 0)
    np.fill_diagonal(cpm, 1 - cpm.sum(1))

    tree = grouping.build_tree(cpm, depth=2, g_max=[50], p_min=[0.0075])
    grouping.validate_tree(tree, 18)
    assert grouping.tree_depth(tree) == 2
    assert sorted(grouping.tree_leaves(tree)) == list(range(18))
    assert len(tree) == 3
    for child in tree:
        assert sorted(sorted(g) for g in child) in [sorted([sub_blocks[k], sub_blocks[k + 1]]) for k in (0, 2, 4)]
    # Depth 1 on the same CPM stops at the super-blocks; explicit second-level limits apply.
    assert grouping.tree_depth(grouping.build_tree(cpm, depth=1)) == 1
    tree = grouping.build_tree(cpm, depth=2, g_max=[50, 2], p_min=[0.0075])
    for child in tree:
        if not grouping.is_leaf_group(child):
            assert all(len(g) <= 2 for g in child)


def test_dataset_tree_of_shapes_nests_the_coarse_levels_coarsest_first(tmp_path):
    hierarchy = common.shapes_hierarchy()  # shape (2) > shape_fill (12) > fine (72)
    data = types.SimpleNamespace(name="shapes", num_classes=72, hierarchy=hierarchy)

    def tree_at(depth):  # as hiernet.py --tree-from dataset --depth D builds it
        args = types.SimpleNamespace(depth=depth, tree_from="dataset", groups=None, resume=None, g_max=[50], p_min=[0])
        return grouping.run_tree(args, data, tmp_path, None)[0]

    def one_parent(classes, level):
        return len(set(hierarchy.parents[level][classes])) == 1

    tree = tree_at(2)
    grouping.validate_tree(tree, 72)
    assert grouping.tree_depth(tree) == 2 and len(tree) == 2
    for child in tree:  # one shape per top-level child, one shape_fill class per leaf group, each whole
        assert one_parent(grouping.tree_leaves(child), 0) and len(child) == 6
        for group in child:
            assert one_parent(group, 1) and group == hierarchy.children(1, hierarchy.parents[1][group[0]]).tolist()
    tree = tree_at(1)  # depth 1: the finest coarse level
    assert len(tree) == 12 and all(one_parent(g, 1) and len(g) == 6 for g in tree)


def test_validate_tree_rejects_a_missing_class():
    with pytest.raises(SystemExit, match="must appear once"):
        grouping.validate_tree([[0, 1], [3]], 4)
    with pytest.raises(SystemExit, match="mixes"):
        grouping.validate_tree([[0, [1, 2]], [3]], 4)


def test_confusion_probability_matrix_against_a_loop():
    torch.manual_seed(0)
    logits = torch.randn(40, 5) * 2
    labels = torch.arange(40) % 5
    loader = [(logits[i : i + 16], labels[i : i + 16]) for i in range(0, 40, 16)]
    cpm = grouping.confusion_probability_matrix(lambda x: x, loader, 5, device="cpu")
    probs = logits.double().softmax(1)
    for i in range(5):
        rows = [probs[k] for k in range(40) if labels[k] == i]
        np.testing.assert_allclose(cpm[i], (sum(rows) / len(rows)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(cpm.sum(1), 1.0, rtol=1e-9)


def test_command_line_writes_tree_files(tmp_path, capsys):
    blocks = shuffled_blocks([3, 3, 2], seed=5)
    cpm = planted_cpm(blocks, 8, seed=5)
    np.save(tmp_path / "cpm.npy", cpm)
    names = [f"c{i}" for i in range(8)]
    (tmp_path / "names.json").write_text(json.dumps(names))
    out = tmp_path / "tree.json"
    grouping.main(["--cpm", str(tmp_path / "cpm.npy"), "--names", str(tmp_path / "names.json"), "--out", str(out)])
    obj = json.loads(out.read_text())
    assert sorted(obj["groups"]) == sorted(blocks)
    assert obj["named_tree"][0] == [names[c] for c in obj["tree"][0]]
    assert "GROUP 1" in (tmp_path / "tree.txt").read_text()
    assert "digraph" in (tmp_path / "tree.dot").read_text()
    assert "GROUP 3" in capsys.readouterr().out
    assert grouping.load_tree(out, 8) == obj["tree"]


def test_run_dir_regroups_the_runs_cpm_with_its_own_g_max_and_p_min(tmp_path):
    import common
    import hiernet

    argv = ["--dataset", "shapes", "--train-size", "64", "--test-size", "1600", "--image-size", "8", "--n", "1"]
    args = hiernet.get_args([*argv, "--split", "1", "--extra-blocks", "0", "--g-max", "3", "--p-min", "0.0"])
    common.write_json(tmp_path / "args.json", {**vars(args), "script": "hiernet"})
    assert (
        grouping.get_args(["--run-dir", str(tmp_path)]).g_max,
        grouping.get_args(["--run-dir", str(tmp_path)]).p_min,
    ) == ([3], [0.0])
    given = grouping.get_args(["--run-dir", str(tmp_path), "--g-max", "7", "--p-min", "0.5"])
    assert (given.g_max, given.p_min, given.depth) == ([7], [0.5], 1)
    with pytest.raises(SystemExit, match="no cpm.npy"):  # the grouping stage has not run: nothing to regroup
        grouping.main(["--run-dir", str(tmp_path)])
    np.save(tmp_path / "cpm.npy", np.eye(4))  # --cpm is read and checked while parsing
    assert grouping.get_args(["--cpm", str(tmp_path / "cpm.npy")]).g_max == [50]
    with pytest.raises(SystemExit, match="72 classes in its dataset, a 4-class cpm.npy"):
        grouping.main(["--run-dir", str(tmp_path)])
    blocks = shuffled_blocks([3] * 24, seed=2)
    np.save(tmp_path / "cpm.npy", planted_cpm(blocks, 72, seed=2))
    tree = grouping.main(["--run-dir", str(tmp_path)])
    sizes = [len(g) for g in tree]
    assert max(sizes) <= 3 and max(sizes) > 1  # the run's g_max, and p_min 0 lets every pair merge


def test_grouping_does_not_import_hiernet():
    """hiernet.py imports grouping.py; the other way round would be a cycle."""
    tree = ast.parse((ROOT / "grouping.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "hiernet" not in imported


def test_random_tree_keeps_every_group_size_covers_every_class_once_and_is_reproducible():
    # A depth-2 CPM tree of unequal groups (the shape --tree-from random copies).
    rng = np.random.default_rng(6)
    perm = rng.permutation(30)
    blocks = [sorted(perm[a:b].tolist()) for a, b in ((0, 4), (4, 9), (9, 12), (12, 20), (20, 30))]
    cpm = planted_cpm(blocks, 30, seed=6)
    tree = grouping.build_tree(cpm, depth=2, g_max=[50, 5], p_min=[0.0075])
    assert grouping.tree_depth(tree) == 2  # the structure to keep has nested groups
    shuffled = grouping.random_tree(tree, seed=0)
    grouping.validate_tree(shuffled, 30)  # every class exactly once
    assert grouping.tree_sizes(shuffled) == grouping.tree_sizes(tree)  # every group's size, at every level
    assert grouping.tree_depth(shuffled) == grouping.tree_depth(tree)
    assert shuffled == grouping.random_tree(tree, seed=0)  # reproducible from its seed
    assert shuffled != grouping.random_tree(tree, seed=1)
    assert shuffled != tree
    assert all(g == sorted(g) for g in _leaf_groups(shuffled))
    # The classes are spread: no found group survives whole (30 classes, 5 groups: chance about 1e-3).
    assert not {tuple(g) for g in _leaf_groups(tree)} & {tuple(g) for g in _leaf_groups(shuffled)}
    # Its own generator: the global numpy and torch states are not drawn from.
    np.random.seed(0)
    torch.manual_seed(0)
    before = np.random.rand(), torch.rand(1)
    np.random.seed(0)
    torch.manual_seed(0)
    grouping.random_tree(tree, seed=3)
    assert (np.random.rand(), torch.rand(1)) == before
    assert grouping.tree_sizes([[3, 1], [[0], [2, 4]]]) == [2, [1, 2]]


def _leaf_groups(tree):
    return [tree] if grouping.is_leaf_group(tree) else [g for child in tree for g in _leaf_groups(child)]
