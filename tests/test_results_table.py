"""The README's results section is exactly what tools/results_table.py builds from results/."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_section_is_built_from_results_dir():
    tool = load_tool()
    readme = (ROOT / "README.md").read_text()
    assert tool.section(ROOT / "results") in readme, "run: python tools/results_table.py --write README.md"


def test_every_run_in_results_has_metrics_and_its_command(tmp_path):
    for run_json in (ROOT / "results").glob("*/run.json"):
        assert (run_json.parent / "metrics.json").exists(), run_json.parent
        assert "python " in run_json.read_text()


def test_write_replaces_only_the_marked_section(tmp_path):
    tool = load_tool()
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{tool.START}\nold numbers\n{tool.END}\nafter\n")
    tool.main(["--write", str(readme)])
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n")
    assert "old numbers" not in text and "| resnet56 | 128 |" in text


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
    assert hdl[0].endswith(f"| wall | {tool.SEVERITY_HEADER} |") and hdl[1] == "| --- " * 7 + "|"
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
        "hdl_cifar100_hdl_800",
        "hdl_cifar100_sweep_pick_800",
    ):
        assert f"`{run}`" in text and "not run yet" in text.split(f"`{run}`")[1].splitlines()[0]
    assert "centre-loss sweep (`hdl_sweep_cifar100_*` in tools/gpu_runs.py): not run yet." in text
    (tmp_path / "hdl_sweep_cifar100").mkdir()
    (tmp_path / "hdl_sweep_cifar100" / "sweep.md").write_text(
        "# lambda0 sweep\n\n| variant | lambda0 |\n|---|---|\n| a | 1 |\n"
    )
    text = tool.section(tmp_path)
    assert "held out (`hdl_stack.py --sweep-table`):\n\n| variant | lambda0 |\n|---|---|\n| a | 1 |\n" in text


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
    assert [(r[0].strip("| "), r[1]) for r in rows] == [
        (n, tree)
        for n in ("3", "9")
        for tree in ("CPM tree (the paper's)", "random tree", "backbone trained as long (`--control`)")
    ]
    m = json.loads((tmp_path / "hiernet_cifar100_n3" / "metrics.json").read_text())
    gain = m["slow_acc"] - m["backbone_acc"]
    assert rows[0][3:6] == [f"{m['backbone_acc']:.2f}", f"{m['slow_acc']:.2f}", f"{gain:+.2f}"]
    assert rows[1][2] == "`hiernet_cifar100_n3_randomtree`: not run yet"
    assert rows[2][3:6] == [
        f"{m['backbone_acc']:.2f}",
        f"{m['control_acc']:.2f}",
        f"{m['control_acc'] - m['backbone_acc']:+.2f}",
    ]
    assert all("not run yet" in r[2] for r in rows[3:])
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
