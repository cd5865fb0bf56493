"""The README's generated blocks are exactly what tools/results_table.py builds from results/; the report's
tables of one run, the HDL sweep's table, and the tool's independence of the training scripts."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_section_is_built_from_results_dir():
    tool = load_tool()
    readme = (ROOT / "README.md").read_text()
    for name, block in tool.blocks(ROOT / "results").items():
        assert block in readme, f"{name}: run python tools/results_table.py --write README.md"


def test_every_run_in_results_has_metrics_and_its_command(tmp_path):
    for run_json in (ROOT / "results").glob("*/run.json"):
        assert (run_json.parent / "metrics.json").exists(), run_json.parent
        assert "python " in run_json.read_text()


def test_write_replaces_only_the_marked_blocks(tmp_path):
    tool = load_tool()
    readme = tmp_path / "README.md"
    text = "before\n" + "".join(f"{tool.markers(n)[0]}\nold numbers\n{tool.markers(n)[1]}\nhand\n" for n in tool.BLOCKS)
    readme.write_text(text + "after\n")
    tool.main(["--write", str(readme)])
    text = readme.read_text()
    assert (
        text.startswith("before\n") and text.endswith("\nhand\nafter\n") and text.count("\nhand\n") == len(tool.BLOCKS)
    )
    assert "old numbers" not in text and "| resnet56 | 128 |" in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="has no runs markers"):
        tool.main(["--write", str(readme)])


def test_section_builds_from_a_partial_results_dir(tmp_path):
    import shutil

    tool = load_tool()
    shutil.copy(ROOT / "results" / "bench.json", tmp_path / "bench.json")
    shutil.copytree(ROOT / "results" / "hdl_stack_shapes", tmp_path / "hdl_stack_shapes")
    text = tool.section(tmp_path)
    assert "`hiernet_cifar10_n3` | not run yet" in text
    assert "Not run: `hiernet_cifar10_n3`, `hiernet_cifar10_n3_pmin0.075`" in text
    assert "HierNet on CIFAR-100, Table 1 (ResNet): not run yet." in text
    assert "`python hdl_stack.py --dataset shapes`" in text and "| resnet56 | 128 |" in text


def test_hiernet_cifar100_tables_from_a_partial_results_dir(tmp_path):
    import shutil

    tool = load_tool()
    shutil.copytree(ROOT / "results" / "hiernet_cifar100_n9", tmp_path / "hiernet_cifar100_n9")
    m = json.loads((tmp_path / "hiernet_cifar100_n9" / "metrics.json").read_text())
    text = tool.section(tmp_path)
    table1 = text.split("#### HierNet on CIFAR-100, Table 1")[1].split("\n\n")[1].splitlines()
    rows = {line.split(" | ")[0].strip("| "): line for line in table1[2:]}
    assert sorted(rows, key=int) == ["3", "5", "7", "9", "18"]
    for n in ("3", "5", "7", "18"):
        assert "not run yet" in rows[n]
    gain = m["slow_acc"] - m["backbone_acc"]
    assert f"| {m['backbone_acc']:.2f} (68.38) | {m['slow_acc']:.2f} (72.15) |" in rows["9"]
    assert f"{gain:+.2f} (+3.77)" in rows["9"] and "(90.6)" in rows["9"]
    assert "HierNet on CIFAR-100, Table 2 (ELU ResNet): not run yet." in text


def test_hiernet_seed_table_gives_each_seed_and_their_mean_and_std(tmp_path):
    import shutil

    tool = load_tool()
    assert "Seeds of Table 1" not in tool.section(tmp_path)  # one seed: no seed table
    accs = []
    for seed, backbone in ((0, 60.0), (1, 62.0), (2, 67.0)):
        run = "hiernet_cifar100_n9" + (f"_seed{seed}" if seed else "")
        shutil.copytree(ROOT / "results" / "hiernet_cifar100_n9", tmp_path / run)
        m = json.loads((tmp_path / run / "metrics.json").read_text())
        m["backbone_acc"] = backbone
        (tmp_path / run / "metrics.json").write_text(json.dumps(m))
        accs.append(backbone)
    text = tool.section(tmp_path)
    seeds = text.split("Seeds of Table 1")[1].split("\n\n")[1].splitlines()[2:]
    assert [line.split(" | ")[1] for line in seeds] == ["0", "1", "2", "mean +- std (3 seeds)"]
    # 60, 62, 67: mean 63.00, sample std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) = 3.61
    assert "| 63.00 +- 3.61 |" in seeds[-1]
    # Table 1's row is the mean over the seeds beside the paper's, the seeds named.
    table1 = text.split("#### HierNet on CIFAR-100, Table 1")[1].split("\n\n")[1].splitlines()
    row9 = next(line for line in table1 if line.startswith("| 9 |"))
    assert row9.startswith("| 9 | 56 | 0, 1, 2 | 63.00 +- 3.61 (68.38) |")
    m = json.loads((tmp_path / "hiernet_cifar100_n9" / "metrics.json").read_text())
    assert f"| {m['n_groups']} / {m['n_groups']} / {m['n_groups']} |" in row9
    assert text.count("--dataset cifar100 --data-dir data --n 9") >= 3  # every seed's command


def test_collect_copies_finished_runs_without_checkpoints(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_runs", ROOT / "tools" / "gpu_runs.py")
    gpu_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_runs)
    src, results = tmp_path / "src", tmp_path / "results"
    (src / "done" / "stage").mkdir(parents=True)
    (src / "done" / "metrics.json").write_text("{}")
    (src / "done" / "stage" / "checkpoint.pt").write_bytes(b"weights")
    (src / "done" / "stage" / "stopped.json").write_text("{}")
    (src / "done.run.json").write_text('{"name": "old", "command": "python x.py", "calls": []}')
    (src / "done.log").write_text("epoch 1\n")
    (src / "running").mkdir()
    (src / "running.run.json").write_text("{}")
    assert gpu_runs.collect(src, results) == ["done"]
    assert sorted(p.relative_to(results).as_posix() for p in results.rglob("*") if p.is_file()) == [
        "done/metrics.json",
        "done/run.json",
        "done/stage/stopped.json",
        "done/train.log",
    ]
    assert json.loads((results / "done" / "run.json").read_text())["name"] == "done"


def test_severity_column_only_where_a_run_carries_it(tmp_path):
    import shutil

    tool = load_tool()
    for run in ("hdl_stack_shapes", "hdl_stack_cifar10", "merged_resnet_shapes", "coarse_outer_product_shapes"):
        shutil.copytree(ROOT / "results" / run, tmp_path / run)
    before = tool.section(tmp_path)
    assert tool.SEVERITY_HEADER not in before
    # A newer hdl_stack_shapes run: a hierarchical_metrics dict per model, and one with no mistakes.
    path = tmp_path / "hdl_stack_shapes" / "metrics.json"
    m = json.loads(path.read_text())
    m["baseline"]["hierarchical"] = {"top1": 99.0, "mistake_severity": 1.5}
    m["hdl"]["hierarchical"] = {"top1": 100.0, "mistake_severity": None}
    path.write_text(json.dumps(m))
    # A newer merged run: per architecture, at alpha 0 and at the chosen alpha.
    path = tmp_path / "merged_resnet_shapes" / "metrics.json"
    m = json.loads(path.read_text())
    archs = list(m["costs"])
    m["hierarchical_metrics"] = {
        a: {"alpha": 0.5, "at_alpha0": {"mistake_severity": 1.0 + i}, "at_alpha": {"mistake_severity": 0.25 + i}}
        for i, a in enumerate(archs)
    }
    path.write_text(json.dumps(m))
    after = tool.section(tmp_path)

    hdl = after.split("### Hierarchical deep loss")[1].split("\n\n")[1].splitlines()
    assert hdl[0].endswith(f"| wall, card, commit | {tool.SEVERITY_HEADER} |") and hdl[1] == "| --- " * 7 + "|"
    shapes_row = next(line for line in hdl if "--dataset shapes" in line)
    cifar_row = next(line for line in hdl if "--dataset cifar10" in line)
    assert shapes_row.endswith("| baseline 1.50, hdl - |")
    assert cifar_row.endswith(" |  |")  # the older run: blank
    assert all(line.count("|") == 8 for line in hdl)
    merged = after.split("### Merged coarse/fine")[1].split("\n\n")[1].splitlines()
    for i, a in enumerate(archs):
        line = next(line for line in merged if f"| {a} |" in line)
        assert line.endswith(f"| at_alpha0 {1.0 + i:.2f}, at_alpha {0.25 + i:.2f} |")
    # Tables without any severity stay as they were.
    part = "### Coarse network x VGG16"
    assert after.split(part)[1].split("###")[0] == before.split(part)[1].split("###")[0]


def test_severity_cell_names_by_the_distinguishing_keys():
    tool = load_tool()
    assert tool.severity_cell({"acc": 90.0}) == ""
    assert tool.severity_cell({"hierarchical": {"mistake_severity": 2.0}}) == "2.00"
    m = {"hierarchical": {"backbone": {"mistake_severity": 2.0}, "slow": {"mistake_severity": 1.25}}}
    assert tool.severity_cell(m) == "backbone 2.00, slow 1.25"
    assert tool.severity_cell(m, within="slow") == "1.25"


def test_cifar100_rows_say_not_run_and_the_hdl_sweep_table_is_included(tmp_path):
    tool = load_tool()
    text = tool.section(tmp_path)
    for run in (
        "merged_resnet_cifar100_resnet164",
        "coarse_outer_product_cifar100",
        "hdl_cifar100_baseline_800",
        "hdl_cifar100_hdl_800",
        "hdl_cifar100_sweep_pick_800",
    ):
        assert f"`{run}`" in text and "not run yet" in text.split(f"`{run}`")[1].splitlines()[0]
    assert "centre-loss sweep (`hdl_sweep_cifar100_*` in tools/gpu_runs.py): not run yet." in text
    sweep = tmp_path / "hdl_sweep_cifar100"
    plant_sweep_run(sweep / "baseline", None, 30.0)
    plant_sweep_run(sweep / "epoch_raw_1", ("epoch", "raw", 1.0), 30.5)
    text = tool.section(tmp_path)
    expected = tool.hdl_sweep(sweep, tool.queued_sweep_cells(sweep))[0].strip().splitlines()[2:]
    assert "Pick: not yet; 2 of 11 cells" in text and expected[0].startswith(
        "| variant (heads/update/features/alpha) | lambda0 |"
    )
    assert "held out (`tools/results_table.py --sweep-table`):\n\n" + "\n".join(expected) in text


def test_hdl_800_baseline_row_reads_its_run_and_goes_beside_each_hdl_row(tmp_path):
    """Table 3's baseline is a run of its own: its row has its command, fine error, the fine softmax summed per
    level (it has no level heads), wall, card and commit; each HDL row's baseline column is its fine error."""
    tool = load_tool()
    run = tmp_path / "hdl_cifar100_baseline_800"
    run.mkdir()
    summed = {"category12": 12.5, "category6": 11.25, "category2": 1.5}
    m = {"dataset": "cifar100", "baseline": {"fine_error": 29.5, "summed_fine_level_error": summed}}
    (run / "metrics.json").write_text(json.dumps(m))
    info = {
        "command": "python hdl_stack.py --method baseline",
        "device": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11"},
    }
    info |= {
        "wall_seconds": 1362.0,
        "calls": [{"seconds": 1362.0, "jobs_sharing_gpu": 1, "git_commit": "abcdef0123", "git_dirty": False}],
    }
    (run / "run.json").write_text(json.dumps(info))
    hdl = tool.section(tmp_path).split("#### Hierarchical deep loss")[1].split("\n\n")[1].splitlines()
    row = next(line for line in hdl if "--method baseline" in line).split(" | ")
    assert row[1:4] == ["29.50", "", "fine summed: category12 12.50, category6 11.25, category2 1.50"]
    assert row[5] == "22.7 min, H100, abcdef0 |"
    assert "`hdl_cifar100_baseline_800`" not in "\n".join(hdl)
    # An HDL run landed: the baseline's fine error goes beside it.
    run = tmp_path / "hdl_cifar100_hdl_800"
    run.mkdir()
    hdl_result = {"fine_error": 30.25, "level_error": summed, "violation_rate": {"with_fine": 2.0}}
    (run / "metrics.json").write_text(json.dumps({"dataset": "cifar100", "hdl": hdl_result}))
    (run / "run.json").write_text(json.dumps(info | {"command": "python hdl_stack.py"}))
    hdl = tool.section(tmp_path).split("#### Hierarchical deep loss")[1].split("\n\n")[1].splitlines()
    row = next(line for line in hdl if "`python hdl_stack.py` (800" in line).split(" | ")
    assert row[1:3] == ["29.50", "30.25"] and row[4:6] == ["2.00", "22.7 min, H100, abcdef0 |"]


def test_hdl_gap_block_applies_its_rule_to_each_landed_reading(tmp_path):
    """Each reading of the gap: its validation error, the lowest point of its curve (metrics.jsonl), and
    GAP_RULE's verdict against its reference (Table 3's 35.70, or a run not landed yet)."""
    tool = load_tool()

    def plant(run, fine_error, curve=()):
        path = tmp_path / run
        path.mkdir(parents=True)
        m = {"epochs": 800, "baseline": {"fine_error": fine_error, "final_train_acc": {"train_acc": 99.5}}}
        (path / "metrics.json").write_text(json.dumps(m))
        lines = [json.dumps({"epoch": e, "val_fine_acc": 100 - err}) for e, err in enumerate(curve, 1)]
        (path / "metrics.jsonl").write_text("\n".join(lines + [json.dumps({"epoch": 9, "loss": 1.0})]) + "\n")

    def rows():
        lines = tool.hdl_gap_block(tmp_path)
        return [line.split(" | ") for line in lines if line.startswith(("| the settings", "| fp32"))]

    assert all("not run yet" in r[1] for r in rows()) and len(rows()) == 2
    plant("hdl_gap_cifar100/imagenet_stem_800", 36.5, curve=(50.0, 34.25, 36.5))
    plant("hdl_gap_cifar100/fp32_40", 33.5)
    stem, fp32 = rows()
    assert stem[3:7] == ["36.50", "34.25 (epoch 2)", "99.50", "Table 3: 35.70; accounts for it"]
    assert (
        fp32[3] == "33.50"
        and fp32[4] == ""
        and fp32[6] == "`hdl_stem_cifar100/cifar_baseline`: not run yet; no reference yet"
    )
    plant("hdl_stem_cifar100/cifar_baseline", 33.0)
    assert rows()[1][6] == "`hdl_stem_cifar100/cifar_baseline`: 33.00; does not"
    (tmp_path / "hdl_gap_cifar100/fp32_40/metrics.json").write_text(
        json.dumps({"epochs": 40, "baseline": {"fine_error": 35.25}})
    )
    assert rows()[1][6].endswith("33.00; accounts for it")
    (tmp_path / "hdl_gap_cifar100/imagenet_stem_800/metrics.json").write_text(
        json.dumps({"epochs": 800, "baseline": {"fine_error": 48.0}})
    )
    assert rows()[0][6] == "Table 3: 35.70; does not"


def plant_sweep_run(run, config, fine_error, epochs=40):
    """A --val-fraction run of hdl_stack.py as metrics.json records it: the baseline (config None) or one
    HDL cell (center_update, center_features, lambda0)."""
    run.mkdir(parents=True)
    m = {"eval_split": "val", "epochs": epochs, "majority_error": {"fine": 99.0, "coarse": 80.0}}
    if config is None:
        m["baseline"] = {"fine_error": fine_error}
    else:
        update, features, lam = config
        m["hdl_config"] = {"heads": "cascade", "fine_head": "on", "center_update": update}
        m["hdl_config"] |= {"center_features": features, "center_alpha": 1.0, "lambda_center": lam}
        m["hdl"] = {"fine_error": fine_error, "level_error": {"coarse": fine_error / 2}}
        m["levels_reading"] = "first-sense"
    (run / "metrics.json").write_text(json.dumps(m))


def test_merged_cifar100_rows_and_figure3_tables_come_from_the_longest_grown_run(tmp_path):
    """The CIFAR-100 ResNet-164 runs grow one run a job (gpu_runs' GROWN): the section reads the
    one with the most runs; without a validation split its reference point is the test curve's
    minimum; Figure 3's tables have a row per ensemble size and architecture, +- only where the
    runs or combinations are several, and the run's own sentences on what its runs support."""
    import shutil

    tool = load_tool()
    source = json.loads((ROOT / "results" / "merged_resnet_cifar10" / "metrics.json").read_text())
    for n in (2, 3):
        run = tmp_path / f"merged_resnet_cifar100_resnet164_runs{n}"
        shutil.copytree(ROOT / "results" / "merged_resnet_cifar10", run)
        m = dict(source, runs=n, runs_support=[f"support of {n} runs"])
        m["test_curve_minimum"] = m.pop("best_alpha")
        single = m["curves"]["merge-1/ensemble-1"]["test"]
        m["curves"]["merge-1/ensemble-3"] = {"test": {level: [errors[0]] for level, errors in single.items()}}
        (run / "metrics.json").write_text(json.dumps(m))
    text = tool.section(tmp_path)
    merged = text.split("### Merged coarse/fine")[1].split("### Coarse network")[0]
    assert "`merged_resnet_cifar100_resnet164_runs3` | separate |" in merged and "_runs2` |" not in merged
    assert "- support of 3 runs" in merged and "not run yet" not in merged.split("DenseNet")[0]
    fine = merged.split("| fine: ensemble |")[1].split("\n\n")[0].splitlines()
    three = next(line for line in fine if line.startswith("| ensemble-3 | merge-1 |"))
    one = next(line for line in fine if line.startswith("| ensemble-1 | merge-1 |"))
    assert "+-" not in three and three.count("|") == len(tool.MERGED_ALPHAS) + 4 and one.count(" +- ") == 9


def test_lh_variant_table_pools_stage2_seeds_and_names_the_flags(tmp_path):
    """Stage-2 runs on one extractor: runs differing only in --lh-seed form one row (mean +- std),
    the others are named by the flags that differ from the base run's."""
    tool = load_tool()
    folder = tmp_path / "latent_string_mnist_cpu"
    base_args = {"seed": 0, "lh_seed": None, "lh_schedule": "constant", "gamma": 0.1, "out_dir": "a"}
    runs = {
        "seed0": ({}, 98.0, 97.0, 0),
        "lhseed1": ({"lh_seed": 1, "base_from": "x"}, 99.0, 97.5, 2),
        "lhseed2": ({"lh_seed": 2, "base_from": "x"}, 100.0, 98.0, 0),
        "step": ({"lh_schedule": "step", "base_from": "x"}, 99.5, 99.0, 1),
        "gamma0": ({"gamma": 0.0, "base_from": "x"}, 90.0, 91.0, 0),
    }
    for name, (changes, lh, random, shared) in runs.items():
        run = folder / name
        run.mkdir(parents=True)
        (run / "args.json").write_text(json.dumps({**base_args, **changes, "out_dir": name}))
        lh_result = {"exact_match_acc": lh, "lookup_acc": lh, "val_lookup_acc": lh - 1, "duplicate_strings": []}
        if shared:  # repaired: the code as trained had shared strings and a lower lookup accuracy
            lh_result["before_repair"] = {"duplicate_strings": [[0, 1]] * shared, "lookup_acc": lh - 10}
        metrics = {
            "fc_test_acc": 99.4,
            "lh": lh_result,
            "random_code": {"exact_match_acc": random, "val_lookup_acc": random - 1},
            "params": {"lh_classifier": 31000},
            "reduced_fc_test_acc": 98.0,
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    info = {"command": "python latent_string.py --dataset mnist", "device": {"cpu": "cpu", "torch": "2"}}
    calls = [{"seconds": 60, "status": "done", "jobs_sharing_gpu": 1}]
    (folder / "seed0" / "run.json").write_text(json.dumps({**info, "calls": calls, "wall_seconds": 60}))
    rows, fc = tool.lh_variant_rows(sorted(folder.iterdir()), folder / "seed0")
    assert fc == 99.4
    by_flags = {r[0]: r for r in rows}
    assert list(by_flags) == ["defaults", "`--gamma 0`", "`--lh-schedule step`"]
    defaults = by_flags["defaults"]
    assert defaults[1] == "0, 1, 2"
    assert defaults[4] == "99.00 +- 1.00"  # LH test 98, 99, 100
    assert defaults[6] == "1.50 +- 0.50"  # learnt - random per seed: 1, 1.5, 2
    assert defaults[7] == "95.67 +- 5.86"  # before repair: 98, 89 (seed 1 was repaired), 100
    assert defaults[8] == "0 / 2 / 0"
    assert by_flags["`--lh-schedule step`"][4] == "99.50" and by_flags["`--gamma 0`"][6] == "-1.00"
    text = "\n".join(tool.lh_variant_tables(tmp_path))
    assert "Stage-2 experiments, MNIST, on the CPU (cpu, torch 2)" in text and "| `--gamma 0` | 0 |" in text
    assert "Stage-2 experiments, CIFAR-100, on the extractor of `--seed 1`: not run yet." in text


def test_commit_cell_names_each_commit_a_run_was_made_at():
    tool = load_tool()
    a, b = "a" * 40, "b" * 40
    assert tool.commit_cell({"calls": [{"seconds": 1}]}) == ""  # a run from before the queue recorded it
    assert tool.commit_cell({"git_commit": a, "git_dirty": False, "calls": []}) == "aaaaaaa"
    calls = [{"git_commit": a, "git_dirty": False}, {"git_commit": a, "git_dirty": False}]
    assert tool.commit_cell({"git_commit": a, "calls": calls}) == "aaaaaaa"
    calls.append({"git_commit": b, "git_dirty": True})  # resumed at another commit, with uncommitted changes
    assert tool.commit_cell({"git_commit": b, "calls": calls}) == "aaaaaaa / bbbbbbb (dirty)"


def test_hiernet_controls_table_and_commit_columns(tmp_path):
    """The controls: CPM tree, random tree and the backbone trained as long, each with its gain over its own
    backbone; 'not run yet' where absent; a commit column once a run records its commit."""
    import shutil

    tool = load_tool()
    shutil.copytree(ROOT / "results" / "hiernet_cifar100_n3", tmp_path / "hiernet_cifar100_n3")
    text = tool.section(tmp_path)
    controls = text.split("Controls: where HierNet's gain comes from.")[1].split("\n\n")[1].splitlines()
    assert controls[0].endswith("| groups | wall |")  # no run records a commit: no column
    rows = [line.split(" | ") for line in controls[2:]]
    readings = [  # n = 3 only
        "CPM tree, option-B shortcuts (the authors' code)",
        "CPM tree, fp32 training",
        "CPM tree, the authors' code's schedule (78k iterations, lr-proportional decay)",
    ]
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        (n, tree)
        for n in ("3", "9")
        for tree in ["CPM tree (the paper's)", "random tree"]
        + (readings if n == "3" else [])
        + ["backbone trained as long (`--control`)"]
    ] + [("3, ELU", "CPM tree, p_min 0.005 (Table 2's)"), ("3, ELU", "CPM tree, p_min 0.0075 (ours)")]
    m = json.loads((tmp_path / "hiernet_cifar100_n3" / "metrics.json").read_text())
    gain = m["slow_acc"] - m["backbone_acc"]
    assert rows[0][3:6] == [f"{m['backbone_acc']:.2f}", f"{m['slow_acc']:.2f}", f"{gain:+.2f}"]
    assert rows[1][2] == "`hiernet_cifar100_n3_randomtree`: not run yet"
    assert rows[2][2] == "`hiernet_cifar100_n3_shortcutB`: not run yet"
    assert rows[5][3:6] == [
        f"{m['backbone_acc']:.2f}",
        f"{m['control_acc']:.2f}",
        f"{m['control_acc'] - m['backbone_acc']:+.2f}",
    ]
    assert all("not run yet" in r[2] for r in rows[6:])
    # The random tree's run (its own backbone), made at a recorded commit.
    random_run = tmp_path / "hiernet_cifar100_n3_randomtree"
    shutil.copytree(tmp_path / "hiernet_cifar100_n3", random_run)
    r = {**m, "backbone_acc": 66.0, "slow_acc": 66.5, "tree_source": "random"}
    (random_run / "metrics.json").write_text(json.dumps(r))
    info = json.loads((random_run / "run.json").read_text())
    info["calls"] = [{**c, "git_commit": "c0ffee" + "0" * 34, "git_dirty": False} for c in info["calls"]]
    (random_run / "run.json").write_text(json.dumps({**info, "git_commit": "c0ffee" + "0" * 34, "git_dirty": False}))
    text = tool.section(tmp_path)
    controls = text.split("Controls: where HierNet's gain comes from.")[1].split("\n\n")[1].splitlines()
    assert controls[0].endswith("| groups | wall | commit |")
    random_row = next(line for line in controls if "| random tree |" in line and "| 3 |" in line)
    assert "| `hiernet_cifar100_n3_randomtree` | 66.00 | 66.50 | +0.50 |" in random_row
    assert random_row.endswith("| c0ffee0 |")
    assert all(line.count("|") == 12 for line in controls)
    # Table 1 itself gets the column only when one of its runs has a commit (the random run is not in it).
    table1 = text.split("#### HierNet on CIFAR-100, Table 1")[1].split("\n\n")[1].splitlines()
    assert not table1[0].endswith("| commit |")
    info = json.loads((tmp_path / "hiernet_cifar100_n3" / "run.json").read_text())
    (tmp_path / "hiernet_cifar100_n3" / "run.json").write_text(json.dumps({**info, "git_commit": "d" * 40}))
    table1 = tool.section(tmp_path).split("#### HierNet on CIFAR-100, Table 1")[1].split("\n\n")[1].splitlines()
    assert table1[0].endswith("| commit |") and table1[2].endswith("| ddddddd |")
    assert all(line.count("|") == 15 for line in table1)


def plant_sweep(sweep_dir, baseline, cells, epochs=40):
    """Fake validation runs: a baseline-only run and HDL cells (update, features, lambda0, val fine error)."""
    majority = {"fine": 99.0, "category12": 31.0, "category6": 28.0, "category2": 2.0}
    runs = {"baseline": {"eval_split": "val", "epochs": epochs, "baseline": {"fine_error": baseline}}}
    for update, features, lam, error in cells:
        runs[f"{update}_{features}_{lam:g}"] = {
            "eval_split": "val",
            "epochs": epochs,
            "hdl_config": {
                "heads": "cascade",
                "center_update": update,
                "center_features": features,
                "center_alpha": 1.0 if update == "epoch" else 0.5,
                "lambda_center": lam,
            },
            "hdl": {"fine_error": error, "level_error": {"category12": 20.0, "category6": 18.0, "category2": 1.5}},
            "majority_error": majority,
        }
    for name, metrics in runs.items():
        (sweep_dir / name).mkdir(parents=True, exist_ok=True)
        (sweep_dir / name / "metrics.json").write_text(json.dumps(metrics))


def test_sweep_rule_picks_the_largest_lambda0_within_one_point_of_the_baseline(tmp_path):
    tool = load_tool()
    # Baseline 40.0 on validation. The paper's cell (epoch/raw, 1) trains slowly (55.0): out. Within
    # 1 point: normalized at 1 (40.8), wen at 0.005 (39.0, the lowest error), raw at 0.001 (exactly +1.0).
    cells = [
        ("epoch", "raw", 1.0, 55.0),
        ("epoch", "raw", 0.1, 41.2),
        ("epoch", "raw", 0.001, 41.0),
        ("epoch", "normalized", 1.0, 40.8),
        ("wen", "raw", 0.005, 39.0),
    ]
    plant_sweep(tmp_path / "a", 40.0, cells)
    text = tool.write_hdl_sweep(tmp_path / "a")
    sweep = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert sweep["rule"] == tool.SWEEP_RULE and sweep["margin"] == 1.0
    assert sweep["pick"]["run"] == "epoch_normalized_1"  # the largest lambda0 within the margin, not the lowest error
    assert sweep["pick"]["flags"] == [
        *("--heads", "cascade", "--center-update", "epoch", "--center-features", "normalized"),
        *("--center-alpha", "1", "--lambda-center", "1"),
    ]
    assert "Pick: epoch_normalized_1" in text and tool.SWEEP_RULE in text and "| +15.00 |" in text
    assert "`python hdl_stack.py --dataset cifar100 --method hdl --heads cascade --center-update epoch" in text
    # Cells landed by tools/gpu_runs.py carry their run.json: wall time, card and commit on their row.
    run_json = {"wall_seconds": 210.0, "device": {"gpu": "NVIDIA H100 80GB HBM3"}}
    call = {"jobs_sharing_gpu": 4, "git_commit": "0123456789abcdef"}
    (tmp_path / "a" / "epoch_raw_1" / "run.json").write_text(json.dumps({**run_json, "calls": [call]}))
    text = tool.write_hdl_sweep(tmp_path / "a")
    assert "| epoch_raw_1 | 3.5 min, H100 (4 jobs shared the GPU), 0123456 |" in text
    assert "| epoch_raw_0.1 |  |" in text  # no run.json: blank, never guessed
    # At equal lambda0 the paper's update and features go first, even at a higher error.
    plant_sweep(tmp_path / "b", 40.0, [("epoch", "raw", 1.0, 40.9)] + cells[1:])
    tool.write_hdl_sweep(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "sweep.json").read_text())["pick"]["run"] == "epoch_raw_1"
    # The margin is inclusive; below it, smaller lambda0 only.
    pick = tool.pick_sweep_cell(
        [
            {"run": r, "lambda0": lam, "val_fine_error": e, "baseline_val_fine_error": 40.0, **variant}
            for r, lam, e in (("x", 0.001, 41.0), ("y", 0.01, 41.01))
            for variant in [{"center_update": "epoch", "center_features": "raw"}]
        ]
    )
    assert pick["run"] == "x"
    # No cell within 1 point: no pick, and the table says so.
    plant_sweep(tmp_path / "c", 30.0, cells)
    text = tool.write_hdl_sweep(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "sweep.json").read_text())["pick"] is None and "Pick: none" in text
    # A baseline trained for another number of epochs is no reference: no pick either.
    plant_sweep(tmp_path / "d", 40.0, cells)
    plant_sweep(tmp_path / "d", 40.0, [], epochs=800)  # overwrites the baseline with an 800-epoch one
    assert "Pick: none" in tool.write_hdl_sweep(tmp_path / "d")


TRAINING_SCRIPTS = {"hiernet", "merged_resnet", "coarse_outer_product", "latent_string", "hdl_stack"}


def imported_modules(path):
    tree = ast.parse(path.read_text())
    names = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    names |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    calls = {  # importlib.import_module("name") / __import__("name")
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
        and node.args
        and isinstance(node.args[0], ast.Constant)
    }
    return names | calls


def test_no_tool_imports_a_training_script():
    """tools/ reads run files and may run a script as a subprocess (gpu_runs.py), never import one."""
    tools = sorted((ROOT / "tools").glob("*.py"))
    assert len(tools) >= 5
    for path in tools:
        assert not imported_modules(path) & TRAINING_SCRIPTS, path.name


def test_run_tables_reproduce_the_tables_the_scripts_wrote():
    """Before the report moved out of the scripts, latent_string.py wrote table3.md and coarse_outer_product.py
    tables.md and accuracy_table.md; for runs whose metrics.json has every key, the report gives them again."""
    tool = load_tool()
    run = ROOT / "results" / "latent_string_cifar100"
    assert tool.run_tables(run) == (run / "table3.md").read_text()
    run = ROOT / "results" / "coarse_outer_product_cifar100"
    old = (run / "tables.md").read_text() + "\n\n" + (run / "accuracy_table.md").read_text()
    assert tool.run_tables(run) == old


def test_every_run_in_results_has_its_tables():
    tool = load_tool()
    runs = [p.parent for p in (ROOT / "results").glob("**/args.json") if (p.parent / "metrics.json").is_file()]
    assert len(runs) > 20
    for run in runs:
        assert tool.run_tables(run).startswith("# ") or "`" in tool.run_tables(run), run


def plant_run(run, script, metrics, **args):
    run.mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"script": script, **args}))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def test_hdl_table3_puts_the_papers_row_under_ours(tmp_path):
    tool = load_tool()
    names = [("1L", "category12", 12), ("2L", "category6", 6), ("3L", "category2", 2)]
    errors = {"category12": 20.0, "category6": 15.0, "category2": 2.5}
    m = {
        "dataset": "cifar100",
        "arch": "resnet18",
        "epochs": 800,
        "lr": 0.001,
        "batch_size": 64,
        "eval_split": "test",
        "levels": [{"level": level, "name": name, "num_classes": k} for level, name, k in names],
        "majority_error": {"fine": 99.0, **{name: 90.0 for _, name, _ in names}},
        "baseline": {"fine_error": 40.0, "summed_fine_level_error": errors},
        "hdl": {"fine_error": 41.5, "level_error": errors, "summed_fine_level_error": errors},
    }
    m["hdl"]["violation_rate"] = {"with_fine": 3.0, "levels_only": 1.0}
    text = tool.run_tables(plant_run(tmp_path / "run", "hdl_stack", m))
    assert "| resnet18 (ours) | 40.00 | 41.50 | 20.00 | 15.00 | 2.50 |" in text
    assert "| resnet18 (paper) | 35.70 | 35.70 | 12.23 | 11.43 | 1.20 |" in text
    assert "| majority category (largest in train) | 99.00 | 99.00 | 90.00 | 90.00 | 90.00 |" in text
    own = tool.run_tables(plant_run(tmp_path / "own", "hdl_stack", m, hierarchy="levels.json"))
    assert "(paper)" not in own  # another hierarchy: the paper's numbers do not apply


def test_latent_table3_takes_the_papers_numbers_of_the_dataset(tmp_path):
    tool = load_tool()
    m = {
        "dataset": "mnist",
        "num_classes": 10,
        "bits": 4,
        "backbone": "lenet",
        "fc_test_acc": 99.42,
        "lh": {"exact_match_acc": 98.71, "lookup_acc": 98.70},
        "reduced_fc_test_acc": 99.16,
        "random_code": {"exact_match_acc": 98.86},
        "params": {"fc_classifier": 1573510, "lh_classifier": 126822, "reduced_fc_classifier": 126000},
        "duplicate_class_names": [],
        "throughput": {"test_time_reduction_pct": -16.7, "fc_images_per_s": 388000.0, "lh_images_per_s": 333000.0},
    }
    m["params"]["reduction_pct"] = 100.0 * (1 - 126822 / 1573510)
    text = tool.run_tables(plant_run(tmp_path / "run", "latent_string", m))
    assert "| FC classifier (base) | 99.42 | 1,573,510 | 99.38 | 1.61 M |" in text
    assert "| LH classifier | 98.71 | 126,822 | 99.36 | 31 K |" in text
    assert "parameter reduction (LH vs FC): 91.9%" in text and "classes sharing a string: none" in text
    m["dataset"] = "shapes"
    text = tool.run_tables(plant_run(tmp_path / "shapes", "latent_string", m))
    assert "| LH classifier | 98.71 | 126,822 |  |  |" in text


def test_hiernet_run_table_is_table1_at_its_n(tmp_path):
    tool = load_tool()
    m = {"dataset": "cifar100", "n": 3, "elu": False, "n_groups": 8, "test_images": 5000}
    m |= {"backbone_acc": 66.64, "slow_acc": 70.44, "fast_acc": 69.82, "superclass_acc": 87.4}
    text = tool.run_tables(plant_run(tmp_path / "run", "hiernet", m))
    assert (
        "| ours | 66.64 | 70.44 | 69.82 | 87.40 |" in text
        and "| paper, Table 1 | 65.96 | 68.89 | 68.08 | 86.23 |" in text
    )
    m |= {"dataset": "shapes"}
    assert "CIFAR-100 at n = 3, 5, 7, 9, 18 only" in tool.run_tables(plant_run(tmp_path / "s", "hiernet", m))


def test_run_tables_refuse_what_is_not_a_run(tmp_path):
    tool = load_tool()
    with pytest.raises(SystemExit, match="not a finished run directory"):
        tool.main(["--run", str(tmp_path)])
    with pytest.raises(SystemExit, match="names no script of this project"):
        tool.main(["--run", str(plant_run(tmp_path / "other", "bench", {}))])
    # A damaged args.json (or one that holds no object) is one line naming it, not a traceback.
    for i, (text, message) in enumerate((("{bad", "args.json is unreadable"), ("[1]", "holds no JSON object"))):
        run = plant_run(tmp_path / f"damaged{i}", "hiernet", {})
        (run / "args.json").write_text(text)
        with pytest.raises(SystemExit, match=message):
            tool.main(["--run", str(run)])


def test_what_the_report_holds_of_the_scripts_is_theirs():
    """The report imports no training script; what it needs of one is held in it and checked here."""
    import coarse_outer_product
    import latent_string
    import merged_resnet

    tool = load_tool()
    defaults = {a.dest: a.default for a in latent_string.make_parser()._actions if a.dest != "help"}
    assert {k: defaults[k] for k in tool.LH_FLAGS_OLDER_RUNS_LACK} == tool.LH_FLAGS_OLDER_RUNS_LACK
    for args_json in (ROOT / "results").glob("**/args.json"):
        args = json.loads(args_json.read_text())
        if args.get("script", "latent_string") == "latent_string" and "latent_string" in str(args_json):
            assert set(defaults) - set(args) <= set(tool.LH_FLAGS_OLDER_RUNS_LACK), args_json
    for runs in (1, 2):
        assert tool.merged_runs_support({"runs": runs}) == merged_resnet.runs_support(runs, [1, 2, 4])
    # coarse_outer_product.py records the paper's accuracies in metrics.json (the golden record holds them).
    assert coarse_outer_product.PAPER_ACCURACY == tool.OUTER_PRODUCT_PAPER
    assert coarse_outer_product.PAPER_EPOCHS == tool.OUTER_PRODUCT_PAPER_EPOCHS


def test_scaling_block_computes_the_sweep_speedup_and_names_the_row_not_measured(tmp_path):
    tool = load_tool()
    assert "Not measured yet" in tool.scaling_block(tmp_path)[0]
    one = {"name": "1gpu", "gpus": 1, "models": 4, "epochs_per_model": 2, "wall_seconds": 60.0, "command": "python m"}
    result = {"device": "GPU", "gpus": 2, "torch": "2.11", "ddp": [], "sweep": [one]}
    (tmp_path / "scaling").mkdir()
    (tmp_path / "scaling" / "scaling.json").write_text(json.dumps(result))
    text = "\n".join(tool.scaling_block(tmp_path))
    assert "| `1gpu` | 1 | 1 | 4 x 2 | 60.0 s | 240 | 1.00x |" in text  # 4 models in a minute: 240 an hour
    assert "`2gpu_sweep`: not measured yet" in text
    two = {**one, "name": "2gpu_sweep", "gpus": 2, "processes": 2, "wall_seconds": 40.0}
    result["sweep"].append(two)
    (tmp_path / "scaling" / "scaling.json").write_text(json.dumps(result))
    text = "\n".join(tool.scaling_block(tmp_path))
    assert "| `2gpu_sweep` | 2 | 2 | 4 x 2 | 40.0 s | 360 | 1.50x |" in text and "not measured yet" not in text


def test_speed_block_shows_a_rerun_on_another_card_and_the_mps_probe(tmp_path):
    tool = load_tool()
    rows = [{"backbone": "resnet56", "batch": 128, "usual": 5000.0, "ours": 20000.0, "ceiling": 25000.0}]
    rows[0].update(ours_over_usual=4.0, ours_over_ceiling=0.8)
    rerun = {"device": "Card X", "torch": "t", "images": "random images", "rows": rows}
    (tmp_path / "bench_cardx.json").write_text(json.dumps(rerun))
    mps_rows = [
        {"backbone": "resnet18in", "batch": 64, "k": k, "total_images_per_s": total, "per_process_images_per_s": each}
        for k, total, each in ((1, 100.0, [100.0]), (2, 150.0, [80.0, 70.0]))
    ]
    for r in mps_rows:
        r["total_over_one"] = r["total_images_per_s"] / 100.0
    probe = {"device": "Card X", "compile": True, "steps": 9, "images": "random images", "rows": mps_rows}
    (tmp_path / "bench_mps_probe.json").write_text(json.dumps(probe))
    text = "\n".join(tool.speed_block(tmp_path))
    assert (
        "The same measurement on Card X" in text and "| resnet56 | 128 | 5000 | 20000 | 25000 | 4.00 | 0.80 |" in text
    )
    # Files written before bench --mps named the optimizer were SGD's steps.
    assert "compiled, 9 steps" in text and "| resnet18in | 64 | sgd | 2 | 150 | 80 / 70 | 1.50 |" in text
    assert "Processes sharing one Card X through MPS" in text
    probe["rows"] = [{**r, "optimizer": "adam"} for r in mps_rows]
    (tmp_path / "bench_mps_probe.json").write_text(json.dumps(probe))
    assert "| resnet18in | 64 | adam | 1 | 100 | 100 | 1.00 |" in "\n".join(tool.speed_block(tmp_path))
    # One process per optimizer (fused Adam against the multi-tensor form) shares the GPU with nothing.
    probe["rows"] = [{**mps_rows[0], "optimizer": name} for name in ("adam_foreach", "adam")]
    (tmp_path / "bench_mps_probe.json").write_text(json.dumps(probe))
    alone = "\n".join(tool.speed_block(tmp_path))
    assert "One training process on one Card X (" in alone and "through MPS" not in alone
    assert text.count("The same measurement") == 1  # the MPS file is not taken for a rerun


def test_speed_block_shows_the_hdl_step_bench_and_takes_it_for_no_other_table(tmp_path):
    tool = load_tool()
    rows = [
        {"compiled": "model", "images_per_s": 1000.4, "first_steps_s": 5.5},
        {"compiled": "model and loss", "images_per_s": 1250.0, "first_steps_s": 3.2, "over_model_alone": 1.2495},
    ]
    step = {"device": "Card X", "torch": "t", "batch": 64, "image_size": 32, "steps": 2000, "warmup": 30}
    step.update(rows=rows, command="python bench.py --hdl-step", levels={"category12": 12, "category2": 2})
    (tmp_path / "bench_hdl_step.json").write_text(json.dumps(step))
    text = "\n".join(tool.speed_block(tmp_path))
    assert "hdl_stack.py's training step on one Card X" in text and "levels category12 12, category2 2" in text
    assert "| model | 1000 | 1.00 | 5.5 |" in text and "| model and loss | 1250 | 1.25 | 3.2 |" in text
    assert "The same measurement" not in text and "through MPS" not in text
    assert "commit" not in text  # a file from before bench.py recorded its commit


def test_a_bench_file_that_records_its_commit_and_wall_time_shows_them(tmp_path):
    tool = load_tool()
    rows = [{"compiled": "model", "images_per_s": 1000.0, "first_steps_s": 5.5}]
    step = {"device": "Card X", "torch": "t", "batch": 64, "image_size": 32, "steps": 2000, "warmup": 30}
    step.update(rows=rows, command="python bench.py --hdl-step", levels={"category12": 12})
    step.update(git_commit="0123abcdef", git_dirty=True, wall_seconds=95.4)
    (tmp_path / "bench_hdl_step.json").write_text(json.dumps(step))
    text = "\n".join(tool.speed_block(tmp_path))
    assert "(`python bench.py --hdl-step`, commit 0123abc (dirty), 95 s, compiled, 2000 steps" in text


def test_sweep_rule_waits_for_every_queued_cell(tmp_path):
    tool = load_tool()
    sweep = tmp_path / "hdl_sweep_cifar100"  # the queue's folder: its cells are gpu_runs' hdl_sweep_cifar100_* jobs
    expected = tool.queued_sweep_cells(sweep)
    assert "baseline" in expected and "epoch_raw_1" in expected and len(expected) == 11
    # A small lambda0 within the margin has run; the paper's 1 (the rule's first choice) has not.
    plant_sweep(sweep, 40.0, [("epoch", "raw", 0.001, 40.5)])
    text = tool.write_hdl_sweep(sweep)
    record = json.loads((sweep / "sweep.json").read_text())
    assert record["pick"] is None and "epoch_raw_1" in record["missing"] and "Pick: not yet; 2 of 11 cells" in text
    # Every cell in: the rule picks, and the largest lambda0 within the margin wins.
    cells = [tuple(name.split("_")[:2]) + (float(name.split("_")[2]), 45.0) for name in expected if name != "baseline"]
    cells = [c if c[:3] != ("epoch", "raw", 1.0) else ("epoch", "raw", 1.0, 40.9) for c in cells]
    plant_sweep(sweep, 40.0, cells)
    record = json.loads((sweep / "sweep.json").read_text()) if tool.write_hdl_sweep(sweep) else None
    assert record["missing"] == [] and record["pick"]["run"] == "epoch_raw_1"


def test_wall_names_the_card_each_run_used():
    tool = load_tool()
    calls = [{"seconds": 600.0, "jobs_sharing_gpu": 4}]
    h100 = {"device": {"gpu": "NVIDIA H100 80GB HBM3", "torch": "t"}, "calls": calls, "wall_seconds": 600.0}
    h200 = {**h100, "device": {"gpu": "NVIDIA H200", "torch": "t"}}
    cpu = {
        **h100,
        "device": {"cpu": "AMD EPYC (2 cores)", "torch": "t"},
        "calls": [{"seconds": 1, "jobs_sharing_gpu": 1}],
    }
    assert tool.wall(h100) == "10.0 min, H100 (4 jobs shared the GPU)"
    assert tool.wall(h200) == "10.0 min, H200 (4 jobs shared the GPU)"
    assert tool.wall(cpu) == "10.0 min, CPU"


def test_a_missing_readme_or_results_folder_is_one_line(tmp_path):
    tool = load_tool()
    with pytest.raises(SystemExit, match="--write .*README.md: no such file"):
        tool.main(["--write", str(tmp_path / "README.md")])
    with pytest.raises(SystemExit, match="--results .*nothing: no such folder"):
        tool.main(["--results", str(tmp_path / "nothing")])


def test_stem_rule_names_the_stem_whose_baseline_ends_closer_to_table3_and_waits_for_every_cell(tmp_path):
    tool = load_tool()

    def plant(run, method, error):
        (tmp_path / run).mkdir(parents=True)
        m = {method: {"fine_error": error, "final_train_acc": {"train_acc": 80.0}}}
        (tmp_path / run / "metrics.json").write_text(json.dumps(m))

    plant("hdl_sweep_cifar100/baseline", "baseline", 52.0)
    plant("hdl_sweep_cifar100/epoch_raw_1", "hdl", 82.0)
    lines = tool.hdl_stem_block(tmp_path)
    assert "Verdict: not yet (hdl_stem_cifar100/cifar_baseline, hdl_stem_cifar100/cifar_hdl to run)." in lines
    assert any(line.startswith("| 3x3/1 (the cited CIFAR code) | not run yet |") for line in lines)
    plant("hdl_stem_cifar100/cifar_baseline", "baseline", 38.0)  # 2.3 from Table 3's 35.70, the 7x7 16.3
    plant("hdl_stem_cifar100/cifar_hdl", "hdl", 60.0)
    lines = tool.hdl_stem_block(tmp_path)
    assert "Verdict: the cifar stem (3x3/1 (the cited CIFAR code)), baseline 38.00 against 35.70." in lines
    assert "| 3x3/1 (the cited CIFAR code) | 38.00 (80.00) |  | 60.00 (80.00) |  |" in lines
    # The rule reads the baselines only: a 7x7 baseline closer to 35.70 keeps the 7x7 stem.
    (tmp_path / "hdl_sweep_cifar100/baseline/metrics.json").write_text(
        json.dumps({"baseline": {"fine_error": 36.0, "final_train_acc": {"train_acc": 80.0}}})
    )
    assert any(line.startswith("Verdict: the imagenet stem") for line in tool.hdl_stem_block(tmp_path))


def test_the_3x3_sweep_is_the_stem_cells_and_the_same_variants_and_only_its_pick_is_the_800_epoch_row(tmp_path):
    """The queue's sweep on the 3x3 stem lands beside the stem cells (its baseline and paper cell) in
    results/hdl_stem_cifar100; the 7x7 sweep's pick is shown but not queued; the README block waits for a
    variant beyond the stem cells, then shows the table and, once all have run, the pick's 800-epoch row."""
    import shutil

    tool = load_tool()
    sweep_7x7, sweep_3x3 = tmp_path / "hdl_sweep_cifar100", tmp_path / "hdl_stem_cifar100"
    cells_7x7, cells_3x3 = tool.queued_sweep_cells(sweep_7x7), tool.queued_sweep_cells(sweep_3x3)
    assert cells_3x3 == sorted(
        ["cifar_baseline", "cifar_hdl"] + [f"cifar_{c}" for c in cells_7x7 if c not in ("baseline", "epoch_raw_1")]
    )
    assert tool.queued_sweep_cells(tmp_path / "my_sweep") is None  # any other folder: the cells it holds

    cells = [("epoch", "raw", 0.1, 40.5), ("wen", "raw", 0.005, 41.0)]
    plant_sweep(sweep_7x7, 40.0, cells)
    text, _ = tool.hdl_sweep(sweep_7x7)  # every cell present: the rule picks
    assert (
        "Pick: epoch_raw_0.1" in text and "Not queued: the 800-epoch row takes the pick of the sweep on the 3x3" in text
    )

    plant_sweep(sweep_3x3, 33.0, [])
    (sweep_3x3 / "baseline").rename(sweep_3x3 / "cifar_baseline")  # the stem cell only: the sweep has not run
    assert tool.hdl_sweep_3x3_block(tmp_path)[0].startswith("The centre-loss sweep on the 3x3 stem")
    plant_sweep(sweep_3x3, 33.0, [("epoch", "normalized", 1.0, 33.5)])
    shutil.rmtree(sweep_3x3 / "baseline")  # plant_sweep's own baseline: the stem cell is the reference
    lines = tool.hdl_sweep_3x3_block(tmp_path)
    assert lines[0] == "CIFAR-100 centre-loss sweep, 3x3 stem (the stem cells and the same variants):"
    assert any(line.startswith("| cascade/epoch/normalized/a1 | 1 | 40 | 33.50 | +0.50 |") for line in lines)
    assert any(line.startswith("Pick: not yet;") for line in lines)  # the other queued cells have not run
    text, _ = tool.hdl_sweep(sweep_3x3)  # read as a folder of its own cells: the pick is the 800-epoch row
    assert "Its 800-epoch row (ours, not the paper's setting)" in text
