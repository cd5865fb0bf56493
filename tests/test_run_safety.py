"""The program deletes or replaces only the files it wrote itself; a resume does what it
says (a longer run trains and reports the new epochs, other data are refused, a torn log line is
survived); wrong inputs are one line, not a traceback. Subprocess tests where the exit status or
the whole command is the point."""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import common
from test_run_dirs import run_script  # one subprocess runner for the tests' command lines
import grouping
import hiernet

ROOT = Path(__file__).resolve().parents[1]
TINY_HDL = ["--device", "cpu", "--train-size", "64", "--test-size", "32", "--image-size", "16", "--batch-size", "32"]
# The suffix of our temp files (".tmp" in older versions, when every *.tmp counted as ours).
TEMP_SUFFIX = getattr(common, "TEMP_SUFFIX", ".tmp")


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def tiny_parser():
    return common.add_common_args(argparse.ArgumentParser(), epochs=1, batch_size=8, lr=0.1)


def files(root):
    """Every file under root, by path, byte for byte (the lock file, holding a pid, aside)."""
    paths = (p for p in Path(root).rglob("*") if p.is_file() and p.name != ".lock")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


# --- 1-4: files deleted or replaced without being asked ----------------------------------------------------


def test_reusing_a_run_without_checkpoint_removes_only_the_files_it_wrote(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["--out-dir", str(run_dir), "--device", "cpu"]
    common.setup(common.parse_args(tiny_parser(), argv), "tiny")
    common.write_json(run_dir / "levels.json", {})
    common.append_jsonl(run_dir / "metrics.jsonl", {"epoch": 1, "loss": float("nan")})  # diverged in epoch 1
    common.write_json(run_dir / "stage" / "result.json", {})
    user = {"notes.txt": b"my notes\n\x00\xff", "mine/data.tmp": b"draft", "stage/plot.png": b"png"}
    for name, data in user.items():
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_bytes(data)
    common.setup(common.parse_args(tiny_parser(), argv), "tiny")  # the same command again
    assert (run_dir / "levels.json").exists()  # nothing changes before the first write
    capsys.readouterr()
    common.write_json(run_dir / "metrics.json", {})
    kept = files(run_dir)
    assert {name: kept[name] for name in user} == user  # byte for byte
    assert not (run_dir / "levels.json").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / "stage" / "result.json").exists()
    assert "removed the 4 files of an earlier run" in capsys.readouterr().out


def test_an_out_dir_holding_only_tmp_files_is_not_empty(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "draft.tmp").write_bytes(b"draft \x00")
    for force in ([], ["--force"]):
        result = run_script(["hdl_stack.py", *TINY_HDL, "--epochs", "1", "--out-dir", str(target), *force])
        line = one_error_line(result)
        assert ("not a run directory" if force else "exists and is not empty") in line
        assert files(target) == {"draft.tmp": b"draft \x00"}


def test_resume_removes_only_its_own_stale_temps(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps({"script": "tiny"}))
    (run_dir / "stage").mkdir()
    user = {"notes.tmp": b"keep", "stage/scratch.tmp": b"keep too", f"stage/x{TEMP_SUFFIX}.txt": b"and me"}
    for name, data in user.items():
        (run_dir / name).write_bytes(data)
    stale = run_dir / "stage" / f"checkpoint.pt.k3j_x9aa{TEMP_SUFFIX}"  # our write killed before its rename
    stale.write_bytes(b"half")
    common.setup(common.parse_args(tiny_parser(), ["--resume", str(run_dir), "--device", "cpu"]), "tiny")
    assert not stale.exists()
    assert {name: (run_dir / name).read_bytes() for name in user} == user


def fake_hiernet_run(run_dir):
    """A hiernet run directory with its CPM and its own tree files."""
    argv = ["--dataset", "shapes", "--train-size", "64", "--test-size", "1600", "--image-size", "8", "--n", "1"]
    args = hiernet.get_args([*argv, "--split", "1", "--extra-blocks", "0", "--g-max", "3", "--p-min", "0.0"])
    run_dir.mkdir()
    (run_dir / "args.json").write_text(json.dumps({**vars(args), "script": "hiernet"}))
    rng = np.random.default_rng(0)
    cpm = rng.uniform(0, 1, (72, 72))
    np.save(run_dir / "cpm.npy", cpm / cpm.sum(1, keepdims=True))
    for name in ("tree.json", "tree.txt", "tree.dot"):
        (run_dir / name).write_text(f"the run's own {name}\n")
    return run_dir


def test_regrouping_never_writes_over_a_runs_own_tree(tmp_path):
    run_dir = fake_hiernet_run(tmp_path / "run")
    before = files(run_dir)
    result = run_script(["grouping.py", "--run-dir", str(run_dir), "--out", str(run_dir / "tree.json")])
    assert "a file of the run directory" in one_error_line(result)
    (run_dir / "tree.json").unlink()  # the .txt beside it is still the run's
    result = run_script(["grouping.py", "--run-dir", str(run_dir), "--out", str(run_dir / "tree.json")])
    assert "tree.txt is a file of the run directory" in one_error_line(result)
    assert files(run_dir) == {k: v for k, v in before.items() if k != "tree.json"}
    # A new name in the run directory, or anywhere else, is written.
    result = run_script(["grouping.py", "--run-dir", str(run_dir), "--out", str(run_dir / "regrouped.json")])
    assert result.returncode == 0, result.stderr
    assert (run_dir / "regrouped.json").is_file() and (run_dir / "tree.txt").read_bytes() == before["tree.txt"]


# --- 7: a torn last line of metrics.jsonl ---------------------------------------------------------------


def test_jsonl_survives_a_torn_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    common.append_jsonl(log, {"epoch": 1})
    with open(log, "a") as f:
        f.write('{"epoch": 2, "lo')  # a kill during the write
    assert common.read_jsonl(log) == [{"epoch": 1}]
    common.append_jsonl(log, {"epoch": 2})
    assert log.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'  # the half record is cut, not glued onto
    with open(log, "a") as f:
        f.write('{"epoch": 3}')  # a whole record that lost only its newline is kept
    assert common.read_jsonl(log)[-1] == {"epoch": 3}
    common.append_jsonl(log, {"epoch": 4})
    assert [r["epoch"] for r in common.read_jsonl(log)] == [1, 2, 3, 4]


# Tiny VGG configurations for CPU runs of coarse_outer_product.py (as in its own tests).
TINY_VGG = {13: [8, "M", 8, "M", 8, "M", 8, "M", 512, "M"], 16: [8, "M", 8, "M", 8, 8, "M", 8, "M", 512, "M"]}
TINY_COP = ["--image-size", "32", "--train-size", "300", "--test-size", "100", "--val-per-class", "1"]
TINY_COP += ["--batch-size", "16", "--coarse-epochs", "1", "--pretrain-epochs", "1", "--recovery-epochs", "1"]
TINY_COP += ["--ch-restarts", "1", "--coarse-k", "4", "--device", "cpu", "--diversity", "none"]


@pytest.fixture
def tiny_vgg(monkeypatch):
    for depth, config in TINY_VGG.items():
        monkeypatch.setitem(common.VGG_CONFIGS, depth, config)


def test_coarse_outer_product_finishes_a_run_whose_log_was_torn(tiny_vgg, tmp_path):
    import coarse_outer_product as cop

    out = tmp_path / "run"
    cop.main(TINY_COP + ["--epochs", "1", "--method", "baseline", "--out-dir", str(out)])
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"stage": "ete", "epoch": 1, "lo')  # killed while logging the next stage's first epoch
    metrics = cop.main(["--resume", str(out), "--method", "ete"])
    assert metrics["accuracy"]["ete"]["epochs"] == 1
    again = cop.main(["--resume", str(out), "--method", "ete", "--epochs", "2"])  # and every later resume
    assert again["accuracy"]["ete"]["epochs"] == 2 and again["accuracy"]["baseline"]["epochs"] == 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)


# --- 5: coarse_outer_product.py --resume --epochs N on a finished run -------------------------------------


def test_coarse_outer_product_longer_resume_trains_and_reports_the_new_epochs(tiny_vgg, tmp_path):
    import coarse_outer_product as cop

    out = tmp_path / "run"
    first = cop.main(TINY_COP + ["--epochs", "1", "--method", "baseline", "--out-dir", str(out)])
    assert first["accuracy"]["baseline"]["epochs"] == 1
    longer = cop.main(["--resume", str(out), "--epochs", "3"])
    records = [r for r in common.read_jsonl(out / "metrics.jsonl") if r["stage"] == "baseline"]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert longer["accuracy"]["baseline"]["epochs"] == 3 and longer["accuracy"]["baseline"]["max_epochs"] == 3
    assert json.loads((out / "baseline" / "result.json").read_text())["epochs"] == 3
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "tools" / "results_table.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    assert "| VGG16 baseline | 3 |" in report.run_tables(out)  # the report reads the longer run's metrics.json


# --- 8: --resume with another data set --------------------------------------------------------------------


def fake_mnist(root, seed):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", 60), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)  # the same labels in both: the images differ
        header = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">u4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = bytes([0, 0, 8, 1]) + np.array([n], dtype=">u4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return root


TINY_LS = ["--dataset", "mnist", "--device", "cpu", "--epochs", "1", "--lh-epochs", "1", "--batch-size", "32"]
TINY_LS += ["--lh-batch-size", "32", "--bits-sweep", "none", "--hidden-sweep", "none", "--repair-epochs", "1"]


def test_resume_refuses_another_data_set(tmp_path):
    import latent_string

    fake_mnist(tmp_path / "mnist", seed=0)
    fake_mnist(tmp_path / "other", seed=1)
    fake_mnist(tmp_path / "copy", seed=0)  # the same data in another place
    out = tmp_path / "run"
    latent_string.main([*TINY_LS, "--data-dir", str(tmp_path / "mnist"), "--out-dir", str(out)])
    common._release_run()  # this process's lock on the run: the subprocesses below resume it
    before = files(out)
    result = run_script(["latent_string.py", "--resume", str(out), "--data-dir", str(tmp_path / "other")])
    line = one_error_line(result)
    assert "not the data the run trained on" in line and "train image_sample" in line
    assert files(out) == before
    result = run_script(["latent_string.py", "--resume", str(out), "--data-dir", str(tmp_path / "copy")])
    assert result.returncode == 0, result.stderr
    # A run from before fingerprints records the data of its next resume, and holds to them.
    (out / "data_fingerprint.json").unlink()
    latent_string.main(["--resume", str(out), "--data-dir", str(tmp_path / "copy")])
    assert (out / "data_fingerprint.json").read_bytes() == before["data_fingerprint.json"]


# --- 6: latent_string.py --resume --lh-epochs N after a code repair ----------------------------------------


def test_latent_string_longer_lh_stage_repairs_its_code_again(tmp_path):
    import latent_string

    out = tmp_path / "run"
    argv = [*TINY_LS, "--data-dir", str(fake_mnist(tmp_path / "mnist", seed=0)), "--val-per-class", "1"]
    first = latent_string.main([*argv, "--out-dir", str(out)])
    assert "before_repair" in first["lh"]  # the 1-epoch LH stage's code needed a repair (seeded)
    old_repair = (out / "lh_repaired" / "checkpoint.pt").read_bytes()
    longer = latent_string.main(["--resume", str(out), "--lh-epochs", "3"])
    stages = [(r["stage"], r["epoch"]) for r in common.read_jsonl(out / "metrics.jsonl")]
    assert stages.index(("lh", 3)) < len(stages) - 1 - stages[::-1].index(("lh_repaired", 1))  # repaired after
    assert (out / "lh_repaired" / "checkpoint.pt").read_bytes() != old_repair
    # The reported stage 2 is the longer one's: its validation curve and its code, repaired from it.
    assert longer["lh"]["before_repair"] != first["lh"]["before_repair"] or longer["codes"] != first["codes"]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["lh"] == common._plain(longer["lh"])


# --- tracebacks left: each one line and a non-zero exit ----------------------------------------------------


def test_a_checkpoint_of_another_architecture_is_one_line(tmp_path):
    import hdl_stack

    argv = [*TINY_HDL, "--method", "baseline", "--epochs", "1"]
    hdl_stack.main([*argv, "--arch", "preact_resnet18", "--out-dir", str(tmp_path / "preact")])
    hdl_stack.main([*argv, "--out-dir", str(tmp_path / "run")])
    common._release_run()
    other = (tmp_path / "preact" / "baseline" / "checkpoint.pt").read_bytes()
    (tmp_path / "run" / "baseline" / "checkpoint.pt").write_bytes(other)  # copied into the wrong run
    result = run_script(["hdl_stack.py", "--resume", str(tmp_path / "run"), "--epochs", "2"])
    line = one_error_line(result)
    assert "checkpoint.pt: does not fit this" in line and "another architecture" in line


def test_force_on_a_symbolic_link_replaces_the_run_it_names_and_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "args.json").write_text(json.dumps({"script": "tiny"}))
    (real / "stage").mkdir()
    common.save_checkpoint(real / "stage" / "checkpoint.pt", {"epoch": 1})
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    run_dir, _ = common.setup(
        common.parse_args(tiny_parser(), ["--out-dir", str(link), "--force", "--device", "cpu"]), "tiny"
    )
    common.write_json(run_dir / "metrics.json", {})
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir() if p.name != ".lock") == sorted(
        [common.WRITTEN, "args.json", "metrics.json"]
    )
    assert not list(tmp_path.glob("*.replaced-*"))


def test_a_hierarchy_nested_too_deep_is_one_line(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' * 100000 + "[]" + "}" * 100000)
    result = run_script(["hdl_stack.py", *TINY_HDL, "--hierarchy", str(deep), "--out-dir", str(tmp_path / "run")])
    assert "nested too deep" in one_error_line(result)
    nested = tmp_path / "nested.json"  # deep enough for Python's recursion, not for the JSON parser
    nested.write_text('{"a": ' * 900 + "[]" + "}" * 900)
    with pytest.raises(SystemExit, match="nested deeper than"):
        common.load_hierarchy_file(nested, ["x"])
    groups = tmp_path / "groups.json"
    groups.write_text("[" * 100000 + "0" + "]" * 100000)
    with pytest.raises(SystemExit, match="nested too deep"):
        grouping.load_tree(groups, 1)
    groups.write_text("[" * 900 + "0" + "]" * 900)
    with pytest.raises(SystemExit, match="nested deeper than"):
        grouping.load_tree(groups, 1)
    assert not (tmp_path / "run").exists()
