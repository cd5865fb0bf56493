"""tools/plots.py on a tiny fake results folder written in the runs' on-disk formats."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

SCRIPTS = (
    "common",
    "hiernet",
    "grouping",
    "merged_resnet",
    "coarse_outer_product",
    "latent_string",
    "hdl_stack",
    "bench",
)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def fake_hiernet(run, seed=0, control=True):
    names = ["apple", "bee", "cat", "dog"]
    tree = [[0, 1], [2, 3]]
    write_json(run / "args.json", {"script": "hiernet", "dataset": "cifar100", "n": 3, "seed": seed})
    metrics = {"n_groups": 2, "group_sizes": [2, 2], "backbone_acc": 66.0 + seed, "slow_acc": 70.0, "fast_acc": 69.5}
    if control:
        metrics["control_acc"] = 67.0
    write_json(run / "metrics.json", metrics)
    cpm = np.full((4, 4), 0.02) + np.eye(4) * 0.92
    np.save(run / "cpm.npy", cpm)
    write_json(run / "tree.json", {"tree": tree, "groups": tree, "class_names": names, "depth": 1})


def fake_merged(run):
    alphas = [round(0.1 * i, 1) for i in range(21)]
    curve = {level: [[5.0 - 0.1 * i + r for i in range(21)] for r in (0.0, 0.2)] for level in ("coarse", "fine")}
    write_json(run / "args.json", {"script": "merged_resnet"})
    write_json(
        run / "metrics.json",
        {
            "n_coarse": 2,
            "n_fine": 10,
            "alphas": alphas,
            "curves": {f"{a}/ensemble-1": {"test": curve} for a in ("separate", "merge-1")},
            "best_alpha": {
                f"{a}/ensemble-1/{level}": {"alpha": 1.2, "test_err_mean": 3.9}
                for a in ("separate", "merge-1")
                for level in ("coarse", "fine")
            },
        },
    )


def fake_latent(run, hidden_sweep=True):
    codes = {"0": "00", "1": "01", "2": "10", "3": "11"}
    write_json(run / "args.json", {"script": "latent_string"})
    write_json(
        run / "metrics.json",
        {"dataset": "mnist", "num_classes": 4, "bits": 2, "fc_test_acc": 99.0},
    )
    write_json(run / "class_codes.json", {"codes": codes, "duplicates": []})
    (run / "bits_sweep.tsv").write_text(
        "bits\texact_match_acc\tlookup_acc\n1\t60.0\t50.0\n2\t98.0\t98.0\n3\t98.5\t98.5\n"
    )
    if hidden_sweep:
        (run / "hidden_sweep.tsv").write_text(
            "hidden\tlh_params\texact_match_acc\tlookup_acc\n5\t100\t95.0\t95.0\n10\t200\t98.0\t98.0\n"
        )


def fake_hdl(run):
    write_json(run / "args.json", {"script": "hdl_stack"})
    write_json(
        run / "metrics.json",
        {
            "levels": [{"level": "1L", "name": "coarse", "num_classes": 2}],
            "baseline": {"fine_error": 20.0, "summed_fine_level_error": {"coarse": 4.0}},
            "hdl": {"fine_error": 25.0, "level_error": {"coarse": 5.0}, "summed_fine_level_error": {"coarse": 4.5}},
            "majority_error": {"fine": 90.0, "coarse": 40.0},
            "eval_split": "test",
        },
    )
    lines = [
        {"stage": stage, "epoch": epoch, "train_acc": 50.0 + epoch} for stage in ("baseline", "hdl") for epoch in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_hdl_fine_error_title_names_the_stages_the_run_trained(tmp_path, monkeypatch):
    """A run of both methods is titled 'baseline vs HDL'; a run of one --method (Table 3's are two runs) names
    that stage alone."""
    plots = pytest.importorskip("plots")
    import matplotlib.axes

    titles, set_title = [], matplotlib.axes.Axes.set_title
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_title", lambda ax, label, **kw: titles.append(label) or set_title(ax, label, **kw)
    )
    run = tmp_path / "hdl_800"
    fake_hdl(run)
    plots.plot_hdl_fine_error(run, tmp_path / "both.png")
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"hdl"' not in line]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    plots.plot_hdl_fine_error(run, tmp_path / "one.png")
    assert titles == ["hdl_800: fine error per epoch, baseline vs HDL", "hdl_800: fine error per epoch, baseline"]


def fake_hdl_sweep(folder):
    """A sweep folder as --collect lands it: the baseline cell and one HDL cell, validation per epoch."""
    for cell, method, lam in (("baseline", "baseline", 1.0), ("epoch_raw_0.1", "hdl", 0.1)):
        args = {"script": "hdl_stack", "method": method, "center_update": "epoch", "center_features": "raw"}
        write_json(folder / cell / "args.json", {**args, "lambda_center": lam})
        lines = [{"stage": method, "epoch": epoch, "val_fine_acc": 20.0 + epoch} for epoch in (1, 2)]
        (folder / cell / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def fake_outer_product(run):
    write_json(run / "args.json", {"script": "coarse_outer_product", "dataset": "cifar100"})
    write_json(run / "metrics.json", {"baseline": {"test_acc": 60.0}})
    lines = [
        {"stage": stage, "epoch": epoch, "train_acc": 40.0 + epoch, "val_acc": 30.0 + epoch}
        for stage in ("baseline", "pretrain", "main_ch")
        for epoch in (1, 2, 3)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def fake_bench(path):
    row = {"backbone": "resnet56", "batch": 128, "usual": 5000.0, "ours": 22000.0, "ceiling": 23000.0}
    write_json(path, {"device": "fake GPU", "torch": "2.x", "rows": [row]})


@pytest.fixture
def results(tmp_path):
    folder = tmp_path / "results"
    fake_hiernet(folder / "hiernet_cifar100_n3")
    fake_hiernet(folder / "hiernet_cifar100_n3_seed1", seed=1)
    fake_merged(folder / "merged_resnet_x")
    fake_latent(folder / "latent_string_x")
    fake_hdl(folder / "hdl_stack_x")
    fake_outer_product(folder / "coarse_outer_product_x")
    fake_bench(folder / "bench.json")
    fake_hdl_sweep(folder / "hdl_sweep_cifar100")
    for cell in ("cifar_baseline", "cifar_hdl"):  # the 3x3 stem cells, beside the sweep's 7x7 baseline
        lines = [{"stage": cell[6:], "epoch": epoch, "val_fine_acc": 60.0 + epoch} for epoch in (1, 2)]
        (folder / "hdl_stem_cifar100" / cell).mkdir(parents=True)
        (folder / "hdl_stem_cifar100" / cell / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_every_plot_writes_a_png_of_the_expected_size(results, capsys):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    out = results / "figures"
    written, skipped = plots.draw(plots.results_figures(results), out)
    inches = {
        "hiernet_table1.png": (8, 4.5),
        "hiernet_controls.png": (6.5, 4.5),
        "bench.png": (7, 4),
        "hdl_sweep_cifar100.png": (10, 4.2),
        "hdl_stem_cifar100.png": (6, 4),
        "hiernet_cifar100_n3_cpm.png": plots.cpm_figsize(4),
        "hiernet_cifar100_n3_seed1_cpm.png": plots.cpm_figsize(4),
        "merged_resnet_x_alpha.png": (10, 4.2),
        "latent_string_x_bits.png": (6, 4),
        "latent_string_x_hidden.png": (6, 4),
        "latent_string_x_prefix_tree.png": plots.prefix_tree_figsize(4),
        "hdl_stack_x_fine_error.png": (6, 4),
        "hdl_stack_x_levels.png": (7, 4),
        "coarse_outer_product_x_curves.png": (10, 4.2),
    }
    assert sorted(p.name for p in written) == sorted(inches)
    for name, (width, height) in inches.items():
        assert png_size(out / name) == (round(width * plots.DPI), round(height * plots.DPI)), name
        assert (out / name).stat().st_size < 400_000, name  # committed figures stay small
    # No ELU run, no reading of the backbone gap: those figures are skipped with one line each, not drawn empty.
    assert skipped == [
        f"skip hiernet_table2.png: no hiernet_cifar100_n*_elu run in {results}",
        f"skip hiernet_backbone_readings.png: no hiernet_cifar100_n3 run beside a reading (_shortcutB, _fp32, ...) in {results}",
        f"skip hdl_sweep_3x3_cifar100.png: no cell of the 3x3 sweep beyond the stem cells in {results / 'hdl_stem_cifar100'}",
    ]
    assert "skip hiernet_table2.png" in capsys.readouterr().out


def test_a_missing_sweep_or_run_is_skipped_with_a_message(tmp_path, capsys):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    run = tmp_path / "latent_string_y"
    fake_latent(run, hidden_sweep=False)
    with pytest.raises(SystemExit, match="not a run of this project: .*no_such_run"):  # after the others' figures
        plots.main([str(run), str(tmp_path / "no_such_run")])
    out = capsys.readouterr().out.splitlines()
    assert f"skip latent_string_y_hidden.png: no hidden_sweep.tsv in {run}" in out
    assert f"skip {tmp_path / 'no_such_run'}: not a run directory (no args.json and metrics.json)" in out
    # RUN_DIR mode: the run's own figures go to RUN_DIR/figures, the same as results/ gets.
    assert sorted(p.name for p in (run / "figures").iterdir()) == [
        "latent_string_y_bits.png",
        "latent_string_y_prefix_tree.png",
    ]


def test_runs_older_than_args_script_are_known_by_their_folder(tmp_path):
    plots = pytest.importorskip("plots")
    run = tmp_path / "renamed"
    fake_hdl(run)
    write_json(run / "args.json", {"out_dir": "runs/gpu/hdl_stack_cifar10"})  # no "script": an older run
    assert plots.run_script(run) == "hdl_stack"
    write_json(run / "args.json", {})
    assert plots.run_script(run) is None


def test_hiernet_table_keeps_the_seeds_and_the_control(results):
    plots = pytest.importorskip("plots")
    runs = plots.hiernet_table_runs(results, 3, elu=False)
    assert [m["backbone_acc"] for m in runs] == [66.0, 67.0]  # seed 0, then _seed1
    assert plots.control_gains(runs[0]) == {"control: backbone trained as long": 1.0}
    assert plots.hiernet_table_runs(results, 9, elu=False) == []


def test_tree_order_and_borders():
    plots = pytest.importorskip("plots")
    tree = [[[0, 3], [1]], [2, 4]]
    assert plots.tree_leaves(tree) == [0, 3, 1, 2, 4]
    assert plots.group_borders(tree) == [(2, 1), (3, 0)]  # the subgroup border inside group 1, then the group's
    leaves, edges = plots.prefix_tree_layout({"a": "10", "b": "0", "c": "11"})
    assert leaves == [("b", "0"), ("a", "10"), ("c", "11")]
    assert edges == [("", "0"), ("", "1"), ("1", "10"), ("1", "11")]


def test_without_matplotlib_one_line_and_a_nonzero_exit(results, tmp_path):
    # A module named matplotlib that fails to import stands in for a machine without it.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plots.py"), "--results", str(results)],
        check=False,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(shim)},
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: tools/plots.py needs matplotlib (a development dependency of tools/ only): pip install matplotlib"
    ]
    assert not (results / "figures").exists()


def test_the_scripts_never_import_matplotlib():
    for script in SCRIPTS:
        assert "matplotlib" not in (ROOT / f"{script}.py").read_text(), script
    code = f"import {', '.join(SCRIPTS)}, sys; assert 'matplotlib' not in sys.modules, 'imported'"
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_controls_figure_reads_the_random_tree_and_control_runs(tmp_path):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    with pytest.raises(plots.Skip, match="no hiernet_cifar100_n\\*_randomtree run or --control run"):
        plots.plot_hiernet_controls(tmp_path, tmp_path / "c.png")
    fake_hiernet(tmp_path / "hiernet_cifar100_n3_randomtree", control=False)  # slow 70.0, backbone 66.0
    write_json(
        tmp_path / "hiernet_cifar100_n3_randomtree_seed1" / "metrics.json", {"slow_acc": 60.0, "backbone_acc": 65.0}
    )
    assert plots.random_tree_gains(tmp_path, 3) == [4.0, -5.0] and plots.random_tree_gains(tmp_path, 9) == []
    plots.plot_hiernet_controls(tmp_path, tmp_path / "c.png")
    assert png_size(tmp_path / "c.png") == (round(6.5 * plots.DPI), round(4.5 * plots.DPI))


def test_backbone_readings_figure_needs_a_reading_and_draws_the_seeds_beside_it(tmp_path):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    fake_hiernet(results / "hiernet_cifar100_n3")
    fake_hiernet(results / "hiernet_cifar100_n3_seed1", seed=1)
    out = tmp_path / "readings.png"
    with pytest.raises(plots.Skip, match="beside a reading"):  # our seeds alone: nothing to compare
        plots.plot_hiernet_backbone_readings(results, out)
    fake_hiernet(results / "hiernet_cifar100_n3_fp32", control=False)
    assert png_size(plots.plot_hiernet_backbone_readings(results, out)) == (7 * plots.DPI, 4 * plots.DPI)


def test_the_stem_figure_draws_each_landed_cell_once_and_skips_without_any(results, tmp_path, monkeypatch):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    with pytest.raises(plots.Skip, match="no stem cell"):
        plots.plot_hdl_stem(tmp_path, tmp_path / "x.png")
    with pytest.raises(plots.Skip, match="no cell of the 3x3 sweep beyond the stem cells"):  # the fixture's two
        plots.plot_hdl_sweep_3x3(results, tmp_path / "x.png")
    fake_hdl_sweep(results / "hdl_stem_cifar100")  # a variant (and a baseline) beside them: drawn as a sweep
    assert plots.plot_hdl_sweep_3x3(results, tmp_path / "sweep.png").exists()
    monkeypatch.setattr(plots, "save", lambda fig, out: fig)  # the figure itself, to read its legend
    fig = plots.plot_hdl_stem(results, tmp_path / "x.png")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    # The fixture has the 7x7 baseline (the sweep's) and both 3x3 cells, not the sweep's epoch_raw_1.
    assert labels == [
        "7x7 stem, baseline (78.0)",
        "3x3 stem, baseline (38.0)",
        "3x3 stem, hdl (38.0)",
        "Table 3 ResNet-18, 800 epochs, test (35.70)",
    ]


def test_a_saved_figure_is_a_palette_png_that_keeps_its_pixels(tmp_path):
    """save writes 256 colours (PNG colour type 3) instead of RGBA: flat colours (background, lines, bars) come
    out exact, a colour map's gradient within a few levels of matplotlib's own render (99% of pixels within 8 of
    255), in fewer bytes."""
    plots = pytest.importorskip("plots")
    if plots.plt is None:
        pytest.skip("matplotlib not installed")
    from PIL import Image

    def figure():
        fig, (left, right) = plots.plt.subplots(1, 2, figsize=(6, 3))
        left.bar([0, 1], [1, 2], color=[plots.OURS, plots.PAPER])
        right.imshow(np.linspace(0, 1, 64 * 64).reshape(64, 64), cmap="viridis")
        return fig

    reference = tmp_path / "reference.png"
    figure().savefig(reference, dpi=plots.DPI)
    plots.save(figure(), tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes()[25] == 3  # IHDR colour type: palette
    assert (tmp_path / "figure.png").stat().st_size < reference.stat().st_size
    ours = np.asarray(Image.open(tmp_path / "figure.png").convert("RGB"), dtype=int)
    theirs = np.asarray(Image.open(reference).convert("RGB"), dtype=int)
    assert ours.shape == theirs.shape
    for colour in ("white", plots.OURS, plots.PAPER):  # every pixel of a flat colour keeps it exactly
        rgb = np.round(np.asarray(plots.matplotlib.colors.to_rgb(colour)) * 255).astype(int)
        where = (theirs == rgb).all(-1)
        assert where.sum() > 100 and (ours[where] == rgb).all(), colour
    error = np.abs(ours - theirs).max(-1)  # per pixel, in levels of 255
    assert error.mean() < 1.0 and np.percentile(error, 99) <= 8


def test_damaged_inputs_are_one_line_and_a_torn_log_line_is_skipped(tmp_path, capsys):
    plots = pytest.importorskip("plots")
    pytest.importorskip("matplotlib")
    run = tmp_path / "hiernet_x"
    fake_hiernet(run)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="--out .*afile is a file, not a folder"):
        plots.main([str(run), "--out", str(tmp_path / "afile")])
    log = tmp_path / "metrics.jsonl"  # a run still writing: its last line torn
    log.write_text('{"stage": "a", "epoch": 1, "val_acc": 5}\n{"stage": "a", "epo')
    assert plots.results_table.read_jsonl(log) == [{"stage": "a", "epoch": 1, "val_acc": 5}]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    (run / "args.json").write_text("{bad")
    with pytest.raises(SystemExit, match="args.json: unreadable JSON"):
        plots.main([str(run)])
