import io
import json
import subprocess
from pathlib import Path

import pytest
import torch

import bench

ROOT = Path(__file__).resolve().parent.parent


def test_mps_status_finds_the_pipe_it_is_pointed_at(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    status = bench.mps_status()
    assert status["pipe_directory"] == str(tmp_path) and not status["pipe_found"]
    (tmp_path / "control").touch()
    status = bench.mps_status()
    assert status["pipe_found"]
    assert status["clients_use_mps"] == status["control_daemon_running"]  # a pipe alone is not a daemon


def test_mps_bench_times_k_processes_together(tmp_path):
    out = tmp_path / "bench_mps.json"
    argv = ["--mps", "1", "2", "--mps-config", "preact11:8", "--steps", "3", "--warmup", "1"]
    bench.main(argv + ["--device", "cpu", "--mps-out", str(out)])
    result = json.loads(out.read_text())
    assert result["command"] == "python bench.py " + " ".join(argv + ["--device", "cpu", "--mps-out", str(out)])
    assert set(result["mps"]) >= {"control_daemon_running", "server_running", "clients_use_mps"}
    rows = result["rows"]
    assert [(r["backbone"], r["batch"], r["k"]) for r in rows] == [("preact11", 8, 1), ("preact11", 8, 2)]
    for r in rows:
        assert r["images"] == r["k"] * 3 * 8 and len(r["per_process_images_per_s"]) == r["k"]
        assert r["total_images_per_s"] == pytest.approx(r["images"] / r["wall_s"])
        # The wall time covers every process's own timed steps, so the total is at most their sum.
        assert r["total_images_per_s"] <= sum(r["per_process_images_per_s"]) * (1 + 1e-9)
        assert r["start_spread_s"] < r["wall_s"]
    assert rows[0]["total_over_one"] == 1.0 and rows[1]["total_over_one"] > 0


def test_mps_bench_measures_each_optimizer_against_its_own_one_process_figure(tmp_path):
    out = tmp_path / "bench_mps.json"
    argv = ["--mps", "1", "--mps-config", "preact11:4", "--mps-optimizer", "adam_foreach", "adam"]
    bench.main(argv + ["--steps", "2", "--warmup", "1", "--device", "cpu", "--mps-out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["optimizer"], r["k"], r["total_over_one"]) for r in rows] == [("adam_foreach", 1, 1.0), ("adam", 1, 1.0)]


def test_an_mps_worker_steps_with_the_optimizer_it_is_given(monkeypatch, capsys):
    made = []
    real = dict(bench.MPS_OPTIMIZERS)
    for name in real:
        monkeypatch.setitem(bench.MPS_OPTIMIZERS, name, lambda p, d, name=name: made.append(name) or real[name](p, d))
    monkeypatch.setattr("sys.stdin", io.StringIO("go\n"))
    args = bench.get_args(["--steps", "2", "--warmup", "1", "--device", "cpu", "--mps-worker", "preact11:4:0:adam"])
    bench.mps_worker(args)
    result = json.loads(capsys.readouterr().out.split("RESULT ")[1])
    assert made == ["adam"] and result["images"] == 2 * 4
    # The baseline stays Adam's multi-tensor form; the scripts' Adam is the fused one on CUDA.
    cuda = torch.device("cuda")
    foreach = real["adam_foreach"]([torch.nn.Parameter(torch.ones(2))], cuda).param_groups[0]
    fused = real["adam"]([torch.nn.Parameter(torch.ones(2))], cuda).param_groups[0]
    assert foreach["capturable"] and not foreach["fused"] and fused["capturable"] and fused["fused"]


@pytest.mark.parametrize("bad", ["nope:8", "preact11:0", "preact11:x"])
def test_mps_bench_rejects_a_bad_config_before_measuring_any(bad, tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(bench, "run_processes", lambda *a: started.append(a))
    argv = ["--mps", "1", "--mps-config", "preact11:8", "--mps-config", bad]
    with pytest.raises(SystemExit, match="backbone:batch \\(batch at least 1\\)"):
        bench.main(argv + ["--device", "cpu", "--mps-out", str(tmp_path / "x")])
    assert started == []  # the good first config was not measured either


def test_mps_bench_workers_build_hdl_backbone_and_record_compile(tmp_path, monkeypatch):
    """resnet18in is hdl_stack.py's backbone; --compile reaches every worker's command line and the record."""
    commands = []

    class FakeProcess:  # a worker that is ready at once and reports 8 images in one second
        def __init__(self, command, **kwargs):
            commands.append(command)
            self.stdout = iter(["READY\n", 'RESULT {"start": 0.0, "end": 1.0, "images": 8}\n'])
            self.stdin = type("Sink", (), {"write": lambda *a: None, "flush": lambda *a: None})()

        def wait(self):
            return 0

    monkeypatch.setattr(bench.subprocess, "Popen", FakeProcess)
    out = tmp_path / "bench_mps.json"
    argv = ["--mps", "2", "--mps-config", "resnet18in:64", "--compile", "--device", "cpu", "--mps-out", str(out)]
    bench.main(argv + ["--commit", "0123abc"])  # named: git itself would start a FakeProcess
    assert len(commands) == 2 and all(c[c.index("--compile") + 1] == "whole" for c in commands)
    assert json.loads(out.read_text())["compile"] is True
    model = bench.MPS_BACKBONES["resnet18in"]()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100) and isinstance(model.stem[-1], torch.nn.MaxPool2d)
    cifar_stem = bench.MPS_BACKBONES["resnet18cifar"]()  # hdl_stack.py --stem cifar: no pooling in the stem
    assert cifar_stem(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in cifar_stem.modules())


def test_mps_bench_refuses_regional_compile(tmp_path):
    with pytest.raises(SystemExit, match="regional"):
        bench.main(["--mps", "1", "--compile", "regional", "--device", "cpu", "--mps-out", str(tmp_path / "x")])


def test_hdl_step_bench_times_the_model_compiled_alone_and_with_its_loss(tmp_path, monkeypatch):
    """bench.py --hdl-step: two rows in one run, the second hdl_stack.py's form (the model and its loss compiled as
    one function), with its ratio to the first. Dynamo's eager backend stands in for inductor on the CPU."""
    real_compile, compiled = torch.compile, []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(fn) or real_compile(fn, backend="eager"))
    out = tmp_path / "bench_hdl_step.json"
    argv = ["--hdl-step", "--batch", "4", "--image-size", "16", "--steps", "2", "--warmup", "1", "--device", "cpu"]
    result = bench.main(argv + ["--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r["compiled"] for r in result["rows"]] == ["model", "model and loss"]
    assert isinstance(compiled[0], torch.nn.Module) and not isinstance(compiled[1], torch.nn.Module)
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    ratio = result["rows"][1]["images_per_s"] / result["rows"][0]["images_per_s"]
    assert result["rows"][1]["over_model_alone"] == pytest.approx(ratio)
    assert result["command"].startswith("python bench.py --hdl-step")
    assert result["levels"] == {"category12": 12, "category6": 6, "category2": 2}  # hdl_stack.py's own table


def test_an_output_path_that_cannot_be_written_is_refused_before_the_timing(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for flag, path in (("--out", tmp_path / "afile" / "x.json"), ("--out", tmp_path), ("--mps-out", tmp_path)):
        with pytest.raises(SystemExit) as stop:
            bench.get_args([flag, str(path), "--device", "cpu"])
        assert stop.value.code == 2 and f"{flag} {path}: cannot write a file there" in capsys.readouterr().err
    assert bench.get_args(["--out", str(tmp_path / "new" / "x.json")]).out == str(tmp_path / "new" / "x.json")


def test_a_bench_file_records_the_code_commit_and_the_wall_time(tmp_path):
    """A speed figure is only worth its provenance: the command, the code's commit and the wall time."""
    argv = ["--config", "resnet20:4", "--steps", "1", "--warmup", "1", "--modes", "ours", "--device", "cpu"]
    argv += ["--data-dir", str(tmp_path)]  # no CIFAR-10 there: random images
    bench.main(argv + ["--out", str(tmp_path / "given.json"), "--commit", "0123abc"])
    given = json.loads((tmp_path / "given.json").read_text())
    assert (given["git_commit"], given["git_dirty"]) == ("0123abc", False)  # the copy's code, named by the caller
    assert given["command"].endswith("--commit 0123abc") and given["wall_seconds"] > 0
    bench.main(argv + ["--out", str(tmp_path / "here.json")])
    here = json.loads((tmp_path / "here.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    assert here["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(here["git_dirty"], bool) or here["git_commit"] is None
    with pytest.raises(SystemExit):  # an empty name is refused, not recorded as the commit
        bench.main(argv + ["--out", str(tmp_path / "empty.json"), "--commit", ""])
    assert not (tmp_path / "empty.json").exists()
