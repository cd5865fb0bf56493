"""Run directories, --force, --resume, locks, and files that cannot run code: common.setup /
parse_args / fit / load_checkpoint / load_folder, through the scripts where the behaviour is theirs.
Subprocess tests where an exit status or a signal is the point; everything else in-process and
stopped before data loading where it can be."""

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import coarse_outer_product
import common
import hdl_stack
import hiernet
import merged_resnet

ROOT = Path(__file__).resolve().parents[1]
TINY_HDL = ["--device", "cpu", "--train-size", "64", "--test-size", "32", "--image-size", "16", "--batch-size", "32"]


class Payload:
    """A pickle payload: unpickling it calls open(marker, 'w'), i.e. creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path, marker):
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)


def fake_run(run_dir, script, argv=(), checkpoint=True, get_args=hdl_stack.get_args):
    """A run directory as `script` leaves it after training, without training: args.json from the
    script's own parser, a stage checkpoint and a sentinel file."""
    run_dir.mkdir(parents=True)
    saved = {"script": script, **vars(get_args(list(argv)))} if script else {"epochs": 3}
    (run_dir / "args.json").write_text(json.dumps(saved))
    if checkpoint:
        (run_dir / "stage").mkdir()
        common.save_checkpoint(run_dir / "stage" / "checkpoint.pt", {"epoch": 1})
    (run_dir / "sentinel.txt").write_text("keep me")
    return run_dir


def one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("error: "), message
    return message


def run_script(args, cwd=ROOT, **kw):
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        **kw,
    )


# --- --force and new run directories ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "old_run", "other_script"])
def test_force_refuses_what_is_not_a_run_of_this_script(tmp_path, kind):
    beside = tmp_path / "beside.txt"
    beside.write_text("beside")
    target = tmp_path / "target"
    if kind == "folder":  # e.g. results/: files, no args.json
        target.mkdir()
        (target / "sentinel.txt").write_text("keep me")
    elif kind == "old_run":  # args.json without a script key
        fake_run(target, None)
    else:
        fake_run(target, "hiernet", ["--dataset", "shapes"], get_args=hiernet.get_args)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as excinfo:
        hdl_stack.main(TINY_HDL + ["--out-dir", str(target), "--force"])
    message = one_line(excinfo)
    assert {"folder": "not a run directory", "old_run": "names no script", "other_script": "a hiernet run"}[
        kind
    ] in message
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_force_refuses_the_working_directory(tmp_path, monkeypatch):
    fake_run(tmp_path / "cwd", "hdl_stack")  # even a run of this script: it is where we stand
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(SystemExit, match="working directory"):
        hdl_stack.main(TINY_HDL + ["--out-dir", ".", "--force"])
    assert (tmp_path / "cwd" / "sentinel.txt").read_text() == "keep me"


def test_force_replaces_only_at_the_first_write(tmp_path):
    old = fake_run(tmp_path / "run", "hdl_stack")
    # Inputs that fail after setup (a missing --hierarchy file): the old run stays as it was.
    with pytest.raises(SystemExit, match="not found"):
        hdl_stack.main(TINY_HDL + ["--out-dir", str(old), "--force", "--hierarchy", str(tmp_path / "none.json")])
    assert (old / "sentinel.txt").exists() and (old / "stage" / "checkpoint.pt").exists()
    # Through common alone: setup changes nothing, the first write replaces the directory.
    parser = common.add_common_args(argparse.ArgumentParser(), epochs=1, batch_size=8, lr=0.1)
    run_dir, _ = common.setup(
        common.parse_args(parser, ["--out-dir", str(old), "--force", "--device", "cpu"]), "hdl_stack"
    )
    assert (old / "sentinel.txt").exists()
    common.write_json(run_dir / "metrics.json", {"x": 1})
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", common.WRITTEN, "args.json", "metrics.json"]
    assert (run_dir / common.WRITTEN).read_text() == "args.json\nmetrics.json\n"  # the files the run wrote
    saved = json.loads((run_dir / "args.json").read_text())
    assert saved["script"] == "hdl_stack" and saved["force"] is True
    assert not list(tmp_path.glob("run.replaced-*"))


def test_a_run_that_failed_on_its_inputs_does_not_block_the_same_command(tmp_path):
    argv = TINY_HDL + ["--out-dir", str(tmp_path / "run"), "--hierarchy", str(tmp_path / "none.json")]
    for _ in range(2):  # the second time: the same error, not "exists and is not empty"
        with pytest.raises(SystemExit, match="none.json: file not found"):
            hdl_stack.main(argv)
    # A run of this script that stopped before its first checkpoint is reused without --force.
    parser = common.add_common_args(argparse.ArgumentParser(), epochs=1, batch_size=8, lr=0.1)
    run_dir = tmp_path / "early"
    common.setup(common.parse_args(parser, ["--out-dir", str(run_dir), "--device", "cpu"]), "tiny")
    common.write_json(run_dir / "levels.json", {})
    common.setup(common.parse_args(parser, ["--out-dir", str(run_dir), "--device", "cpu"]), "tiny")
    common.write_json(run_dir / "metrics.json", {})
    assert not (run_dir / "levels.json").exists()  # the failed run's files went with it
    # One without the list of the files it wrote (from before the list) is not reused: it needs --force.
    (run_dir / common.WRITTEN).unlink()
    with pytest.raises(SystemExit, match="exists and is not empty"):
        common.setup(common.parse_args(parser, ["--out-dir", str(run_dir), "--device", "cpu"]), "tiny")


def test_default_run_dirs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(common, "_timestamp", lambda: "20250101-000000")
    parser = common.add_common_args(argparse.ArgumentParser(), epochs=1, batch_size=8, lr=0.1)
    first, _ = common.setup(common.parse_args(parser, ["--device", "cpu"]), "tiny")
    second, _ = common.setup(common.parse_args(parser, ["--device", "cpu"]), "tiny")
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "tiny-20250101-000000-2"


def test_result_files_get_the_umask_mode_and_stale_temps_go(tmp_path):
    old = os.umask(0o027)
    try:
        common.atomic_write_bytes(tmp_path / "a.json", b"{}")
        assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    run_dir = fake_run(tmp_path / "run", "tiny", get_args=lambda argv: argparse.Namespace())
    stale = run_dir / "stage" / f"checkpoint.pt.k3j_x9aa{common.TEMP_SUFFIX}"  # a write killed before its rename
    stale.write_bytes(b"half")
    parser = common.add_common_args(argparse.ArgumentParser(), epochs=1, batch_size=8, lr=0.1)
    common.setup(common.parse_args(parser, ["--resume", str(run_dir), "--device", "cpu"]), "tiny")
    assert not stale.exists() and (run_dir / "stage" / "checkpoint.pt").exists()


def test_write_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as excinfo:
        common.atomic_write_bytes(tmp_path / "file" / "metrics.json", b"{}")  # its folder is a file
    assert "cannot write" in one_line(excinfo) and "metrics.json" in str(excinfo.value)


# --- --resume ---------------------------------------------------------------------------------------------


def test_resume_refuses_another_scripts_run_with_one_line(tmp_path):
    run_dir = fake_run(tmp_path / "run", "hiernet", ["--dataset", "shapes"], get_args=hiernet.get_args)
    before = (run_dir / "args.json").read_text()
    result = run_script(["hdl_stack.py", "--resume", str(run_dir)])
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --resume {run_dir}: a hiernet run, not a hdl_stack run"
    assert (run_dir / "args.json").read_text() == before and not (run_dir / "metrics.json").exists()


def test_resume_refuses_flags_that_change_the_experiment(tmp_path):
    run_dir = fake_run(tmp_path / "run", "hdl_stack", TINY_HDL + ["--epochs", "3"])
    for flags, named in (
        (["--seed", "1"], "--seed 1 (run: 0)"),
        (["--image-size", "32"], "--image-size 32 (run: 16)"),
        (["--arch", "preact_resnet18"], "--arch preact_resnet18"),
        (["--dtype", "fp32"], "--dtype fp32"),
        (["--epochs", "2"], "--epochs 2 (run: 3)"),  # shorter
        (["--dry-run"], "--dry-run True"),
        (["--force"], "give one of them"),
    ):
        with pytest.raises(SystemExit) as excinfo:
            hdl_stack.get_args(["--resume", str(run_dir), *flags])
        assert named in str(excinfo.value), flags
    # Allowed: where it runs, how fast, a longer run; and the same value given again.
    args = hdl_stack.get_args(
        ["--resume", str(run_dir), "--device", "cpu", "--no-cuda-graph", "--epochs", "5", "--seed", "0"]
    )
    assert (args.epochs, args.image_size, args.cuda_graph) == (5, 16, False)
    # hiernet's stages build on each other: no run length may grow there.
    hier = fake_run(tmp_path / "hier", "hiernet", ["--dataset", "shapes", "--epochs", "2"], get_args=hiernet.get_args)
    with pytest.raises(SystemExit, match="lengthen no run length"):
        hiernet.get_args(["--resume", str(hier), "--epochs", "4"])


def test_resume_of_a_dry_run_stays_a_dry_run(tmp_path):
    run_dir = fake_run(tmp_path / "run", "hdl_stack", TINY_HDL + ["--dry-run"])
    with pytest.raises(SystemExit, match="--dry-run directory"):
        hdl_stack.get_args(["--resume", str(run_dir), "--epochs", "40"])
    assert hdl_stack.get_args(["--resume", str(run_dir)]).dry_run is True


def test_damaged_args_and_checkpoints_are_one_line(tmp_path):
    run_dir = fake_run(tmp_path / "run", "hdl_stack", TINY_HDL)
    (run_dir / "args.json").write_text('{"script": "hdl_st')
    with pytest.raises(SystemExit) as excinfo:
        hdl_stack.get_args(["--resume", str(run_dir)])
    assert "args.json is unreadable" in one_line(excinfo)
    ckpt = run_dir / "stage" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # truncated
    with pytest.raises(SystemExit) as excinfo:
        common.load_checkpoint(ckpt)
    assert "cannot load the checkpoint" in one_line(excinfo)


def test_longer_epochs_on_resume_follow_the_stated_schedule_rule(tmp_path):
    """README: the schedule is the new length's from the first step; epochs already run keep
    the learning rates they had. merged_resnet: lr, then /10 at 50% and /100 at 75% of the run."""
    out = tmp_path / "run"
    argv = ["--dataset", "shapes", "--train-size", "200", "--test-size", "50", "--image-size", "16", "--device", "cpu"]
    argv += [
        "--batch-size",
        "32",
        "--depth",
        "11",
        "--architectures",
        "merge-2",
        "--runs",
        "1",
        "--eval-batch-size",
        "250",
    ]
    merged_resnet.main(argv + ["--epochs", "2", "--out-dir", str(out)])
    merged_resnet.main(["--resume", str(out), "--epochs", "4"])
    records = common.read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    steps = records[0]["step"]  # steps per epoch

    def lr_at_end_of(epoch, run_epochs):  # the schedule of a run of run_epochs, at the epoch's last step
        total = run_epochs * steps
        step = epoch * steps - 1
        return 0.1 if step < total // 2 else (0.01 if step < total * 3 // 4 else 0.001)

    expected = [lr_at_end_of(e, 2) for e in (1, 2)] + [lr_at_end_of(e, 4) for e in (3, 4)]
    assert [r["lr"] for r in records] == pytest.approx(expected)
    assert expected != [lr_at_end_of(e, 4) for e in (1, 2, 3, 4)]  # the rule is visible in this run
    saved = json.loads((out / "args.json").read_text())
    assert saved["epochs"] == 2 and saved["overrides"][-1]["changes"]["epochs"] == {"from": 2, "to": 4}
    assert common.run_settings(saved)["epochs"] == 4


# --- files that cannot run code ------------------------------------------------------------------------


def test_planted_checkpoint_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(SystemExit) as excinfo:
        common.load_checkpoint(tmp_path / "checkpoint.pt")
    assert "cannot load the checkpoint" in one_line(excinfo)
    assert not marker.exists()
    # ... and through --resume of a run:
    run_dir = fake_run(tmp_path / "run", "hdl_stack", TINY_HDL + ["--method", "baseline", "--epochs", "1"])
    (run_dir / "baseline").mkdir()
    plant(run_dir / "baseline" / "checkpoint.pt", marker)
    with pytest.raises(SystemExit, match="cannot load the checkpoint"):
        hdl_stack.main(["--resume", str(run_dir)])
    assert not marker.exists()
    # The payload is real: plain unpickling (what an unrestricted torch.load does) runs it.
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


def test_every_checkpoint_fit_writes_loads_weights_only(tmp_path):
    np.random.seed(3)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    loader = common.GpuLoader(
        x.view(16, 1, 2, 2).mul(50).to(torch.uint8), y, 8, device="cpu", mean=(0,), std=(1,), train=True
    )
    plateau = coarse_outer_product.ReduceOnPlateau(0.1)

    def loss_fn(m, xb, yb):
        return torch.nn.functional.cross_entropy(m(xb.flatten(1)), yb)

    step = common.make_train_step(model, loss_fn, opt, device="cpu")
    common.fit(
        tmp_path,
        model,
        opt,
        step,
        loader,
        epochs=1,
        lr_at=plateau,
        extra_state={"plateau": plateau},
        evaluate=lambda e: {"val": np.float64(0.5)},
    )
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state = np.random.get_state()
    np.random.seed(0)
    common.set_rng_state(ckpt["rng"], torch.device("cpu"))
    restored = np.random.get_state()
    assert restored[0] == state[0] and np.array_equal(restored[1], state[1]) and restored[2:] == state[2:]


def test_planted_folder_cache_is_rebuilt_not_run(tmp_path, capsys, monkeypatch):
    from PIL import Image

    rng = np.random.default_rng(0)
    for part in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / part / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / part / c / f"{i}.png")
    train, _, _ = common.load_folder(tmp_path)
    (cache,) = tmp_path.glob(".cache-native-*.pt")
    marker = tmp_path.parent / "pwned-cache"
    plant(cache, marker)
    capsys.readouterr()
    again, _, _ = common.load_folder(tmp_path)
    assert not marker.exists() and torch.equal(again.images, train.images)
    assert "unreadable" in capsys.readouterr().err
    assert torch.load(cache, weights_only=True)["class_names"] == ["cat", "dog"]  # rebuilt
    cache.write_bytes(cache.read_bytes()[:50])  # truncated (a full disk, before atomic writes)
    assert torch.equal(common.load_folder(tmp_path)[0].images, train.images)
    # A folder where the cache cannot be written: decoded without it, one warning.
    cache.unlink()

    def read_only(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(common, "_atomic_write", read_only)
    capsys.readouterr()
    assert torch.equal(common.load_folder(tmp_path)[0].images, train.images)
    err = capsys.readouterr().err
    assert "decoding without a cache" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob(".cache-*"))


# --- stopping -----------------------------------------------------------------------------------------------


def test_nan_in_the_first_epoch_names_no_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = common.GpuLoader(
        torch.zeros(8, 1, 2, 2, dtype=torch.uint8),
        torch.zeros(8).long(),
        4,
        device="cpu",
        mean=(0,),
        std=(1,),
        train=True,
    )
    step = common.make_train_step(model, lambda m, x, y: m(x.flatten(1)).sum() * float("nan"), opt, device="cpu")
    with pytest.raises(SystemExit) as excinfo:
        common.fit(tmp_path, model, opt, step, loader, epochs=1, lr_at=lambda s: 0.1)
    assert "no checkpoint was written yet" in one_line(excinfo) and not (tmp_path / "checkpoint.pt").exists()


def test_ctrl_c_and_the_lock(tmp_path):
    """SIGINT mid-training: exit 130, one line naming the last checkpoint, which loads. While the
    run is alive, a second process resuming it is refused."""
    out = tmp_path / "run"
    argv = ["hdl_stack.py", *TINY_HDL, "--method", "baseline", "--epochs", "500", "--out-dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    ckpt = out / "baseline" / "checkpoint.pt"
    try:
        deadline = time.time() + 300
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert ckpt.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in 300 s"
        second = run_script(["hdl_stack.py", "--resume", str(out)], timeout=120)
        assert second.returncode == 1 and "in use by another process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and str(ckpt) in lines[0] and f"--resume {out}" in lines[0]
    assert common.load_checkpoint(ckpt)["epoch"] >= 1
    assert not list(out.rglob(f"*{common.TEMP_SUFFIX}"))


def test_planted_cifar_pickle_does_not_execute(tmp_path):
    # The CIFAR format is pickle: a planted batch file is refused in one line, its code never runs.
    marker = tmp_path / "pwned"
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    names = {b"fine_label_names": [b"a"] * 100, b"coarse_label_names": [b"b"] * 20}
    (base / "meta").write_bytes(pickle.dumps(names))
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1], b"coarse_labels": [0, 0]}
    (base / "test").write_bytes(pickle.dumps(batch))
    (base / "train").write_bytes(pickle.dumps({**batch, b"payload": Payload(marker)}))
    with pytest.raises(SystemExit) as excinfo:
        common.load_cifar100(tmp_path)
    assert "io.open, which a CIFAR file never holds" in one_line(excinfo)
    assert not marker.exists()
