"""The GPU queue's placement of jobs on several GPUs, and the scaling tool's result file."""

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_jobs_spread_over_gpus_by_load_up_to_the_limit_per_gpu():
    gpu_runs = load("gpu_runs")
    placed = {}
    for job in "abcde":
        gpu = gpu_runs.pick_gpu(job, placed, gpus=2, per_gpu=2)
        if gpu is not None:
            placed[job] = gpu
    assert placed == {"a": 0, "b": 1, "c": 0, "d": 1}  # e waits: both GPUs hold 2
    del placed["b"]
    assert gpu_runs.pick_gpu("e", placed, gpus=2, per_gpu=2) == 1
    assert gpu_runs.pick_gpu("x", {}, gpus=1, per_gpu=4) == 0  # one GPU: the old behaviour


def test_an_alone_job_gets_an_empty_gpu_and_keeps_it_to_itself():
    gpu_runs = load("gpu_runs")
    alone = ("timed",)
    assert gpu_runs.pick_gpu("timed", {"a": 0}, gpus=2, per_gpu=4, alone=alone) == 1
    assert gpu_runs.pick_gpu("timed", {"a": 0, "b": 1}, gpus=2, per_gpu=4, alone=alone) is None
    placed = {"timed": 0}
    for job in "abc":
        placed[job] = gpu_runs.pick_gpu(job, placed, gpus=2, per_gpu=4, alone=alone)
    assert placed == {"timed": 0, "a": 1, "b": 1, "c": 1}
    assert gpu_runs.pick_gpu("d", {"timed": 0}, gpus=1, per_gpu=4, alone=alone) is None


def test_scaling_result_rebuilt_from_a_cut_log_with_speedups(tmp_path, capsys):
    scaling = load("scaling")
    rows = [
        {"name": "1gpu", "gpus": 1, "per_gpu_batch": 64, "images_per_s": 100, "wall_seconds": 30.0},
        {"name": "2gpu", "gpus": 2, "per_gpu_batch": 64, "images_per_s": 150, "wall_seconds": 20.0},
        {"name": "1gpu", "gpus": 1, "models": 4, "wall_seconds": 50.0},
    ]
    log = tmp_path / "scaling.log"
    # The log ends with a row cut short by the call's end and holds a JSON line that is no measurement.
    cut = '{"name": "2gpu_sweep", "gpus": 2, "mod'
    log.write_text('$ python hdl_stack.py ...\n{"note": 1}\n' + "\n".join(json.dumps(r) for r in rows) + f"\n{cut}")
    out = tmp_path / "scaling.json"
    (tmp_path / "scaling.tmp").write_text("a user's file")
    result = scaling.from_log(log, out, "GPU", "2.11", 2)
    assert json.loads(out.read_text()) == result
    assert [r["name"] for r in result["ddp"]] == ["1gpu", "2gpu"] and len(result["sweep"]) == 1
    assert [r["wall_speedup_vs_first"] for r in result["ddp"]] == [1.0, 1.5]
    assert (tmp_path / "scaling.tmp").read_text() == "a user's file"  # the atomic write's temp is its own
    for argv, message in ((["--gpus", "0"], "--gpus: '0'"), (["--from-log", str(tmp_path / "no")], "no such file")):
        with pytest.raises(SystemExit) as stop:
            scaling.main(argv)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_job_waits_for_the_run_it_reads_and_an_orphan_stops_the_queue(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    # Each fake job writes its arguments (before --out-dir) as its metrics.json.
    code = (
        "import sys, pathlib; d = pathlib.Path(sys.argv[-1]); d.mkdir(); (d / 'metrics.json').write_text(sys.argv[1])"
    )
    gpu_runs.JOBS = {"base": ["-c", code, "-"], "variant": ["-c", code, "{runs}/base"], "orphan": ["-c", code, "-"]}
    gpu_runs.AFTER = {"variant": "base", "orphan": "never-queued"}
    runs = tmp_path / "runs"
    gpu_runs.main(["--only", "variant", "base", "orphan", "--no-mps", "--runs-dir", str(runs), "--budget", "120"])
    assert (runs / "variant" / "metrics.json").read_text() == f"{runs.resolve()}/base"
    assert json.loads((runs / "variant.run.json").read_text())["command"].endswith(f"{runs.resolve()}/base")
    assert not (runs / "orphan").exists()
    assert "nothing can start: orphan (after never-queued)" in capsys.readouterr().out


def test_relative_folders_are_the_callers_and_bad_ones_are_refused(tmp_path, monkeypatch, capsys):
    """The queue runs from the checkout's root; --out, --runs-dir and --data-root name folders from where it was
    called (a relative --out once landed in the checkout)."""
    gpu_runs = load("gpu_runs")
    code = "import sys, pathlib; d = pathlib.Path(sys.argv[-1]); d.mkdir(); (d / 'metrics.json').write_text('{}')"
    gpu_runs.JOBS = {"job": ["-c", code]}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data_root").mkdir()
    argv = ["--only", "job", "--no-mps", "--budget", "120", "--runs-dir", "runs", "--out", "pack"]
    gpu_runs.main([*argv, "--data-root", "data_root"])
    assert (tmp_path / "runs" / "job" / "metrics.json").is_file() and (tmp_path / "pack" / "results.tar.gz").is_file()
    assert not (ROOT / "pack").exists()
    (tmp_path / "afile").write_text("x")
    for extra, message in (
        (["--out", "afile"], "--out afile is a file, not a folder"),
        (["--data-root", "missing"], "--data-root"),
        (["--budget", "nan"], "--budget nan: a number of seconds"),
    ):
        monkeypatch.chdir(tmp_path)  # main moved to the checkout's root
        with pytest.raises(SystemExit) as stop:
            gpu_runs.main([*argv, *extra])
        assert stop.value.code == 2 and message in capsys.readouterr().err


FAKE_RUN = """
import json, pathlib, sys
argv = sys.argv[1:]
if "--resume" in argv:
    run_dir = pathlib.Path(argv[argv.index("--resume") + 1])
else:  # a new run: one trained model, a checkpoint
    run_dir = pathlib.Path(argv[argv.index("--out-dir") + 1])
    (run_dir / "predictions").mkdir(parents=True)
    (run_dir / "predictions" / "m-r0.pt").write_text("r0")
    (run_dir / "checkpoint.pt").write_text("weights")
    (run_dir / "args.json").write_text("{}")
files = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())
(run_dir / "metrics.json").write_text(json.dumps({"argv": argv, "files": files}))
"""


def test_a_grown_job_continues_a_copy_of_its_base_with_the_longer_flags(tmp_path):
    gpu_runs = load("gpu_runs")
    script = tmp_path / "fake_run.py"
    script.write_text(FAKE_RUN)
    gpu_runs.JOBS = {"base": [str(script), "--runs", "1"], "grown": [str(script), "--runs", "2"]}
    gpu_runs.GROWN = {"grown": ("base", ["--runs", "2"])}
    gpu_runs.AFTER = {"grown": "base"}
    runs = tmp_path / "runs"
    gpu_runs.main(["--only", "grown", "base", "--no-mps", "--runs-dir", str(runs), "--budget", "120"])
    grown = json.loads((runs / "grown" / "metrics.json").read_text())
    assert grown["argv"] == ["--resume", str(runs.resolve() / "grown"), "--runs", "2"]
    assert grown["files"] == ["args.json", "predictions/m-r0.pt"]  # the base's models, no checkpoint
    # A base whose tables came back without its predictions: the grown job waits rather than
    # train every run again; once begun, it goes on whatever the base's state.
    gpu_runs.RUNS = tmp_path / "other"
    (gpu_runs.RUNS / "base").mkdir(parents=True)
    (gpu_runs.RUNS / "base" / "metrics.json").write_text("{}")
    assert gpu_runs.waits("grown")
    (gpu_runs.RUNS / "base" / "predictions").mkdir()
    assert not gpu_runs.waits("grown")
    (gpu_runs.RUNS / "base" / "metrics.json").unlink()
    (gpu_runs.RUNS / "grown").mkdir()
    (gpu_runs.RUNS / "grown" / "args.json").write_text("{}")
    assert not gpu_runs.waits("grown")


def test_collect_puts_the_hdl_sweep_cells_into_one_folder(tmp_path):
    gpu_runs = load("gpu_runs")
    src, results = tmp_path / "src", tmp_path / "results"
    for name in ("hdl_sweep_cifar100_wen_raw_0.005", "hdl_stack_shapes"):
        (src / name).mkdir(parents=True)
        (src / name / "metrics.json").write_text("{}")
        (src / f"{name}.run.json").write_text('{"command": "python hdl_stack.py", "calls": []}')
    assert gpu_runs.collect(src, results) == ["hdl_stack_shapes", "hdl_sweep_cifar100_wen_raw_0.005"]
    assert (results / "hdl_sweep_cifar100" / "wen_raw_0.005" / "metrics.json").is_file()
    assert (results / "hdl_stack_shapes" / "run.json").is_file()
    # The stem cells land where results_table.STEM_CELLS reads them, and carry the stem they test.
    assert gpu_runs.landed_path("hdl_stem_cifar100_cifar_baseline", results) == (
        results / "hdl_stem_cifar100" / "cifar_baseline"
    )
    for name in ("hdl_stem_cifar100_cifar_baseline", "hdl_stem_cifar100_cifar_hdl"):
        argv = gpu_runs.JOBS[name]
        assert argv[argv.index("--stem") + 1] == "cifar" and argv[argv.index("--epochs") + 1] == "40"


def test_hdl_gap_checks_land_where_results_table_reads_them_and_hold_out_validation():
    """The readings of the gap to Table 3 run on the held-out tenth (never the test set), each differing from
    its reference in the one setting it tests, and land where results_table.GAP_CHECKS reads them."""
    gpu_runs, tool = load("gpu_runs"), load("results_table")
    for run, _, reference in tool.GAP_CHECKS:
        name = "hdl_gap_cifar100_" + run.split("/")[1]
        argv = gpu_runs.JOBS[name]
        assert argv[argv.index("--val-fraction") + 1] == "0.1" and gpu_runs.expected_minutes(name)
        assert gpu_runs.landed_path(name, Path("r")) == Path("r") / run
        if reference:  # the reference is a landed job's run: the same flags but the one tested
            base = gpu_runs.JOBS["hdl_stem_cifar100_" + reference.split("/")[1]]
            assert [a for a in argv if a not in base] == ["--dtype", "fp32"]
    stem = gpu_runs.JOBS["hdl_gap_cifar100_imagenet_stem_800"]
    paper = gpu_runs.JOBS["hdl_cifar100_baseline_800"]
    assert [a for a in stem if a not in paper] == ["--stem", "imagenet", "--val-fraction", "0.1"]


def test_stage2_seed_variants_differ_from_their_base_runs_seed():
    # A base run's own stage 2 is seeded with its --seed: a variant repeating it is not a new seed.
    gpu_runs = load("gpu_runs")

    def flag(argv, name, default):
        return int(argv[argv.index(name) + 1]) if name in argv else default

    seeded = {name: argv for name, argv in gpu_runs.JOBS.items() if "--lh-seed" in argv}
    assert len(seeded) >= 8  # MNIST's and CIFAR-100's seed variants, with and without the step schedule
    for name, argv in seeded.items():
        assert flag(argv, "--lh-seed", None) != flag(argv, "--seed", 0), name
    for base in ("latent_string_cifar100_seed1", "latent_string_mnist_cpu_seed0"):
        plain = [a for n, a in seeded.items() if n.startswith(base.rsplit("_", 1)[0]) and "step" not in a]
        seeds = {flag(a, "--lh-seed", None) for a in plain} | {flag(gpu_runs.JOBS[base], "--seed", 0)}
        assert len(seeds) == 3, base


def test_run_json_records_the_git_commit_of_the_code(tmp_path):
    import subprocess

    gpu_runs = load("gpu_runs")
    code = "import sys, pathlib; d = pathlib.Path(sys.argv[-1]); d.mkdir(); (d / 'metrics.json').write_text('{}')"
    gpu_runs.JOBS = {"job": ["-c", code]}
    runs = tmp_path / "runs"
    gpu_runs.main(["--only", "job", "--no-mps", "--runs-dir", str(runs), "--budget", "120"])
    info = json.loads((runs / "job.run.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    expected = head.stdout.strip() if head.returncode == 0 else None
    assert info["git_commit"] == info["calls"][0]["git_commit"] == expected
    assert info["git_dirty"] == info["calls"][0]["git_dirty"] and isinstance(info["git_dirty"], (bool, type(None)))
    assert gpu_runs.git_state(tmp_path) == (None, None)  # no repository: null, not a guess


def test_random_tree_jobs_are_the_cpm_runs_with_tree_from_random():
    jobs = load("gpu_runs").JOBS
    for n in (3, 9):
        cpm = [a for a in jobs[f"hiernet_cifar100_n{n}"] if a != "--control"]
        assert jobs[f"hiernet_cifar100_n{n}_randomtree"] == [*cpm, "--tree-from", "random", "--compile"]


def test_a_job_stopped_after_it_wrote_its_metrics_is_done_and_a_crash_is_not():
    status = load("gpu_runs").call_status
    assert status(0, over=False, finished=True) == "done"
    assert status(-15, over=True, finished=True) == "done"  # the stop reached it while it was exiting
    assert status(-15, over=True, finished=False) == "stopped"
    assert status(1, over=False, finished=True) == "failed rc=1"  # crashed after metrics.json: shown


def test_a_new_job_that_the_budget_cannot_fit_is_skipped_and_a_shorter_one_starts(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    code = "import sys, pathlib; d = pathlib.Path(sys.argv[-1]); d.mkdir(); (d / 'metrics.json').write_text('{}')"
    gpu_runs.JOBS = {"long": ["-c", code], "short": ["-c", code], "unmeasured": ["-c", code]}
    gpu_runs.expected_minutes = lambda name, sharing: {"long": 10, "short": 1, "unmeasured": None}[name]
    runs = tmp_path / "runs"
    gpu_runs.main(["--only", "long", "short", "unmeasured", "--no-mps", "--runs-dir", str(runs), "--budget", "120"])
    assert not (runs / "long").exists() and not (runs / "long.run.json").exists()
    assert (runs / "short" / "metrics.json").exists() and (runs / "unmeasured" / "metrics.json").exists()
    assert "skip long: needs about 10 min, 2.0 left" in capsys.readouterr().out


def test_without_a_cuda_device_the_cifar_jobs_are_skipped_and_the_others_run(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the guard is for machines without a CUDA device")
    gpu_runs = load("gpu_runs")
    code = "import sys, pathlib; d = pathlib.Path(sys.argv[-1]); d.mkdir(); (d / 'metrics.json').write_text('{}')"
    gpu_runs.JOBS = {"c100": ["-c", code, "--dataset", "cifar100"], "mnist": ["-c", code, "--dataset", "mnist"]}
    assert [gpu_runs.needs_gpu(n) for n in gpu_runs.JOBS] == [True, False]
    runs = tmp_path / "runs"
    gpu_runs.main(["--only", "c100", "mnist", "--no-mps", "--runs-dir", str(runs), "--budget", "120"])
    assert not (runs / "c100").exists() and not (runs / "c100.run.json").exists()
    assert (runs / "mnist" / "metrics.json").exists()
    assert "skip c100: a CIFAR run, and this machine has no CUDA device" in capsys.readouterr().out


def test_every_queued_cifar100_paper_run_has_an_expected_length(tmp_path):
    gpu_runs = load("gpu_runs")
    gpu_runs.PARKED = tmp_path  # whole runs, whatever results/parked holds now
    cifar100 = [n for n, argv in gpu_runs.JOBS.items() if "cifar100" in argv and not n.startswith("latent_string")]
    cifar100 = [n for n in cifar100 if not n.startswith("coarse_outer_product")]  # done; lengths in their run.json
    assert all(gpu_runs.expected_minutes(n) for n in cifar100)
    # HDL's 800-epoch runs on the 3x3 stem (the stem test's verdict): the baseline took 22.7 minutes alone, HDL's
    # heavier step is taken as 24: a lease's 25 minutes starts one, 20 do not (the lease's end would stop it).
    assert gpu_runs.expected_minutes("hdl_cifar100_baseline_800", sharing=1) == 23
    assert gpu_runs.expected_minutes("hdl_cifar100_hdl_800", sharing=1) == 24
    assert "0.0 start hdl_cifar100_hdl_800" in "\n".join(gpu_runs.plan(["hdl_cifar100_hdl_800"], 25, 1))
    assert "skip hdl_cifar100_hdl_800" in "\n".join(gpu_runs.plan(["hdl_cifar100_hdl_800"], 20, 1))
    # Tried (--try), it starts; its own ETA decides on the GPU.
    tried = gpu_runs.plan(["hdl_cifar100_hdl_800"], 20, 1, tried=["hdl_cifar100_hdl_800"])
    assert tried[0].startswith("  0.0 try hdl_cifar100_hdl_800: needs about 24 min, 20.0 left; stopped once its ETA")
    # The plan takes it as dropped once its ETA could tell (3 minutes), and the jobs behind it start then.
    names = ["hdl_cifar100_hdl_800", "hiernet_cifar100_n18"]
    tried = gpu_runs.plan(names, 20, 2, park=names[1:], tried=names[:1], alone=names[:1])
    assert "taken here as dropped by 3.0" in tried[0] and tried[1].startswith("  3.0 start hiernet_cifar100_n18:")
    # --control trains the backbone on for HierNet's iterations: longer than the same run without it.
    assert gpu_runs.expected_minutes("hiernet_cifar100_n3_seed1") > gpu_runs.expected_minutes("hiernet_cifar100_n3_elu")
    assert gpu_runs.expected_minutes("hiernet_cifar100_n18") > gpu_runs.expected_minutes("hiernet_cifar100_n9_elu")
    # Alone a job is faster (n = 9: 17.2 minutes alone, compiled), so a lease of about 20 can start it.
    assert gpu_runs.expected_minutes("hiernet_cifar100_n9_elu", sharing=1) <= 20
    shared = [gpu_runs.expected_minutes("hiernet_cifar100_n7", sharing=k) for k in (1, 2, 3, 4)]
    assert shared == sorted(shared) and shared[-1] == gpu_runs.HIERNET_MINUTES[7]


TIMING = ("seconds", "per_s", "latency")  # wall-clock figures differ between any two runs


def test_a_parked_run_resumes_past_its_finished_stages_to_the_uninterrupted_runs_metrics(tmp_path):
    """park() keeps a stopped run's finished stages (backbone, control) without their optimizers' momentum;
    resuming the parked copy retrains only the stage in progress and ends with the same numbers."""
    import shutil

    import torch

    import hiernet

    gpu_runs = load("gpu_runs")
    whole = tmp_path / "whole"
    expected = hiernet.main(["--dry-run", "--control", "--device", "cpu", "--out-dir", str(whole)])
    # --plan's stages of a --control job come in the order the script trains them (what a lease parks first).
    trained = [json.loads(line)["stage"] for line in (whole / "metrics.jsonl").read_text().splitlines()]
    planned = [stage for stage, _ in gpu_runs.stages_left("hiernet_cifar100_n9_seed2")]
    assert list(dict.fromkeys(trained)) == planned == ["backbone", "control", "hiernet"]
    stopped = tmp_path / "stopped"  # the same run as a lease's end leaves it in HierNet's first epoch
    shutil.copytree(whole, stopped)
    (stopped / "metrics.json").unlink()
    shutil.rmtree(stopped / "hiernet")  # no HierNet checkpoint yet (its logged epoch is dropped by park)
    (tmp_path / "record.json").write_text(json.dumps({"name": "x", "calls": [{"seconds": 5.0}]}))
    parked = tmp_path / "parked" / "x"
    assert gpu_runs.park(stopped, parked, tmp_path / "record.json") == ["backbone", "control"]
    assert not (parked / "hiernet" / "checkpoint.pt").exists() and (parked / "run.json").exists()
    assert (stopped / ".lock").exists() and not (parked / ".lock").exists()  # the stopped process's lock stays
    stages = [json.loads(line)["stage"] for line in (parked / "metrics.jsonl").read_text().splitlines()]
    assert set(stages) == {"backbone", "control"}
    checkpoint = torch.load(parked / "backbone" / "checkpoint.pt", weights_only=True)
    assert checkpoint["optimizer"]["state"] == {} and checkpoint["model"]  # weights kept, momentum dropped

    gpu_runs.RUNS = tmp_path / "runs"
    assert gpu_runs.restore_parked("x", tmp_path / "parked") and not gpu_runs.restore_parked("x", tmp_path / "parked")
    assert json.loads((gpu_runs.RUNS / "x.run.json").read_text())["calls"] == [{"seconds": 5.0}]
    got = hiernet.main(["--resume", str(gpu_runs.RUNS / "x"), "--device", "cpu"])
    same = {k: v for k, v in expected.items() if not any(t in k for t in TIMING)}
    assert {k: got[k] for k in same} == same
    stages = [json.loads(line)["stage"] for line in (gpu_runs.RUNS / "x" / "metrics.jsonl").read_text().splitlines()]
    assert stages == [json.loads(line)["stage"] for line in (whole / "metrics.jsonl").read_text().splitlines()]


def test_collect_lands_parked_stages_and_drops_them_once_the_run_finishes(tmp_path):
    import torch

    gpu_runs = load("gpu_runs")
    gpu_runs.RUNS = tmp_path / "runs"
    run = gpu_runs.RUNS / "job"
    # Two processes log into one metrics.jsonl (merged's sweep): stage a has ended, b is at epoch 2 of 3.
    for stage, epoch in (("a", 3), ("b", 2)):
        (run / stage).mkdir(parents=True)
        state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {0: torch.ones(2)}}, "epoch": epoch, "epochs": 3}
        torch.save(state, run / stage / "checkpoint.pt")
    (run / "args.json").write_text("{}")
    lines = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps({"stage": s, "epoch": e}) + "\n" for s, e in lines))
    out, results = tmp_path / "out", tmp_path / "results"
    (out / "parked").mkdir(parents=True)  # a folder of that name in --out (--out results: results/parked) stays
    (out / "parked" / "mine.txt").write_text("keep")
    gpu_runs.pack(out, False, ["job"])
    assert [p.name for p in out.glob("parked.tar.part*")] == ["parked.tar.part00"]
    assert (out / "parked" / "mine.txt").read_text() == "keep"
    assert sorted(p.name for p in out.iterdir()) == ["parked", "parked.tar.part00", "results.tar.gz"]
    assert gpu_runs.collect(out, results) == []  # nothing finished: only the parked stages land
    assert [p.name for p in (results / "parked").iterdir()] == ["job"]  # the pack held the job alone
    assert (results / "parked" / "job" / "a" / "checkpoint.pt").is_file()
    assert not (results / "parked" / "job" / "b").exists()  # the stage in progress starts over
    parked_lines = (results / "parked" / "job" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in parked_lines] == [1, 2, 3]  # a's lines alone
    (out / "job").mkdir()  # the run finished in a later session: collected, its parked stages dropped
    (out / "job" / "metrics.json").write_text("{}")
    (out / "job.run.json").write_text(json.dumps({"name": "job", "calls": []}))
    for part in out.glob("parked.tar.part*"):
        part.unlink()
    assert gpu_runs.collect(out, results) == ["job"]
    assert not (results / "parked" / "job").exists() and (results / "job" / "metrics.json").is_file()


def test_collect_refuses_a_parked_pack_whose_members_lie_outside_a_jobs_folder(tmp_path):
    """The old stages of each job named in the pack are deleted before it is unpacked: a member "../x" would
    have named results/ itself."""
    import io
    import tarfile

    gpu_runs = load("gpu_runs")
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    (results / "figures").mkdir(parents=True)
    (results / "figures" / "table1.png").write_text("png")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("../figures/x")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    (out / "parked.tar.part00").write_bytes(buffer.getvalue())
    (out / "job").mkdir()  # a finished run beside the bad pack: nothing lands before the pack is checked
    (out / "job" / "metrics.json").write_text("{}")
    (out / "job.run.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"members outside a job's folder \(\['\.\.'\]\)"):
        gpu_runs.collect(out, results)
    assert (results / "figures" / "table1.png").read_text() == "png"
    assert not (results / "job").exists()


def test_collect_replaces_only_run_directories(tmp_path, capsys):
    """A finished run named like a folder of results/ that is no run (figures, parked, a user's) lands nowhere."""
    gpu_runs = load("gpu_runs")
    src, results = tmp_path / "out", tmp_path / "results"
    for name in ("figures", "job"):
        (src / name).mkdir(parents=True)
        (src / name / "metrics.json").write_text("{}")
        (src / name / "args.json").write_text("{}")
        (src / f"{name}.run.json").write_text("{}")
    (results / "figures").mkdir(parents=True)
    (results / "figures" / "table1.png").write_text("png")
    (results / "job").mkdir()
    (results / "job" / "args.json").write_text('{"old": true}')  # an earlier landing of the job: replaced
    assert gpu_runs.collect(src, results) == ["job"]
    assert (results / "figures" / "table1.png").read_text() == "png" and not (
        results / "figures" / "args.json"
    ).exists()
    assert json.loads((results / "job" / "args.json").read_text()) == {}
    assert "skip figures:" in capsys.readouterr().out


def test_collect_refuses_a_folder_that_is_no_unpacked_pack_and_says_when_nothing_landed(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    with pytest.raises(SystemExit) as stop:  # results.tar.gz not unpacked into it yet
        gpu_runs.main(["--collect", str(tmp_path)])
    assert stop.value.code == 2 and "no NAME.run.json there" in capsys.readouterr().err
    (tmp_path / "job.run.json").write_text("{}")  # a job that ran and did not finish
    (tmp_path / "job").mkdir()
    gpu_runs.main(["--collect", str(tmp_path)])
    assert "no run finished there; nothing landed" in capsys.readouterr().out


def test_a_budget_given_in_minutes_is_refused_in_one_line(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    with pytest.raises(SystemExit) as stop:
        gpu_runs.main(["--only", "hiernet_shapes", "--no-mps", "--runs-dir", str(tmp_path), "--budget", "21"])
    assert stop.value.code == 2 and "--budget 21: seconds, not minutes" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was started or written


def test_plan_plays_the_gate_forward_and_starts_a_job_when_a_slot_frees():
    gpu_runs = load("gpu_runs")
    gpu_runs.AFTER = {"after_a": "a"}
    minutes = {"a": 6, "b": 10, "c": 30, "after_a": 3, "d": 5}
    gpu_runs.expected_minutes = lambda name, sharing: minutes[name]
    lines = gpu_runs.plan(["a", "b", "c", "after_a", "d"], minutes=20, parallel=2)
    assert lines[0] == "  0.0 start a: about 6.0 min with 2 sharing, ends 6.0"
    assert lines[1] == "  0.0 start b: about 10.0 min with 2 sharing, ends 10.0"
    # At 6 a's slot frees: c (30) cannot fit the 14 left; after_a may start now that a is done.
    assert lines[2] == "  6.0 skip c: needs about 30 min, 14.0 left"
    assert lines[3] == "  6.0 start after_a: about 3.0 min with 2 sharing, ends 9.0"
    assert lines[4] == "  9.0 start d: about 5.0 min with 2 sharing, ends 14.0"  # b still runs
    assert lines[-1] == " 14.0 all done; 4 slot-minutes idle of 2 x 14.0"
    # An alone job goes first, holds the GPU, and the others share it once it ends.
    lines = gpu_runs.plan(["a", "b", "d"], minutes=20, parallel=2, alone=["d"])
    assert lines[:3] == [
        "  0.0 start d: about 5.0 min with 1 sharing, ends 5.0",
        "  5.0 start a: about 6.0 min with 2 sharing, ends 11.0",
        "  5.0 start b: about 10.0 min with 2 sharing, ends 15.0",
    ]


def test_left_leaves_out_the_runs_in_results_and_their_grouped_folders(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    assert gpu_runs.landed_path("hdl_sweep_cifar100_baseline", tmp_path) == tmp_path / "hdl_sweep_cifar100" / "baseline"
    for done in ("hiernet_cifar100_n3", "hdl_sweep_cifar100_baseline"):
        (gpu_runs.landed_path(done, tmp_path)).mkdir(parents=True)
        (gpu_runs.landed_path(done, tmp_path) / "metrics.json").write_text("{}")
    assert gpu_runs.landed("hdl_sweep_cifar100_baseline", tmp_path) and not gpu_runs.landed(
        "hiernet_cifar100_n5", tmp_path
    )
    # The checkout's own results/: the listed jobs are exactly the queue's jobs whose runs have not
    # landed, in queue order (hiernet_cifar100_n3 has landed; the list changes as runs land).
    gpu_runs.main(["--list", "--left"])
    listed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [name for name in gpu_runs.JOBS if not gpu_runs.landed(name)]
    assert "hiernet_cifar100_n3" in gpu_runs.JOBS and "hiernet_cifar100_n3" not in listed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--plan", "-5"], "argument --plan: '-5': want a number above 0"),
        (["--parallel", "0", "--plan", "10"], "argument --parallel: '0': want a whole number of at least 1"),
        (["--gpus", "x", "--plan", "10"], "argument --gpus: 'x': want a whole number of at least 1"),
        (["--collect", "/no/such/folder"], "--collect /no/such/folder: no such folder"),
    ],
)
def test_bad_queue_flags_are_refused_in_one_line(argv, message, capsys):
    gpu_runs = load("gpu_runs")
    with pytest.raises(SystemExit) as stop:
        gpu_runs.main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_the_centre_loss_sweep_runs_on_both_stems_and_the_pick_job_reads_the_3x3_sweep():
    """The 7x7 sweep's cells keep the stem they ran (explicit, now that CIFAR defaults to the 3x3); the 3x3
    sweep has the same variants, its paper cell being the stem cell; the pick job reads the 3x3 sweep."""
    gpu_runs = load("gpu_runs")
    sweep_7x7 = {n: a for n, a in gpu_runs.JOBS.items() if n.startswith("hdl_sweep_cifar100_")}
    sweep_3x3 = {n: a for n, a in gpu_runs.JOBS.items() if n.startswith("hdl_stem_cifar100_")}
    assert all(gpu_runs.flag_value(a, "--stem") == "imagenet" for a in sweep_7x7.values()) and len(sweep_7x7) == 11
    assert all(gpu_runs.flag_value(a, "--stem") == "cifar" for a in sweep_3x3.values()) and len(sweep_3x3) == 11
    renamed = {"baseline": "baseline", "epoch_raw_1": "hdl"}  # the 3x3 sweep's own: the stem cells
    for name, argv in sweep_7x7.items():
        cell = name.removeprefix("hdl_sweep_cifar100_")
        twin = f"hdl_stem_cifar100_cifar_{renamed.get(cell, cell)}"
        flags_7x7, flags_3x3 = (dict(zip(a[1::2], a[2::2])) for a in (argv, sweep_3x3[twin]))
        if cell == "epoch_raw_1":  # the stem cell leaves the paper's centre loss to hdl_stack.py's defaults
            flags_7x7 = {k: v for k, v in flags_7x7.items() if not k.startswith(("--center-", "--lambda-center"))}
        assert flags_3x3 == {**flags_7x7, "--stem": "cifar"}, twin  # the same cell but for the stem
        assert gpu_runs.landed_path(twin).parent.name == "hdl_stem_cifar100"
    default = gpu_runs.hdl_sweep_pick_job.__defaults__[0]
    assert default.parent.name == "hdl_stem_cifar100" and default.name == "sweep.json"


def test_a_parked_hiernet_run_is_expected_to_take_only_its_stages_left(tmp_path, monkeypatch):
    gpu_runs = load("gpu_runs")
    monkeypatch.setattr(gpu_runs, "PARKED", tmp_path)  # nothing parked yet
    whole = gpu_runs.expected_minutes("hiernet_cifar100_n7")
    assert whole == gpu_runs.HIERNET_MINUTES[7]
    (tmp_path / "hiernet_cifar100_n7").mkdir()
    lines = [{"stage": "backbone", "epoch": e} for e in (1, 2)]
    (tmp_path / "hiernet_cifar100_n7" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert gpu_runs.parked_stages("hiernet_cifar100_n7") == {"backbone"}
    assert gpu_runs.expected_minutes("hiernet_cifar100_n7") == pytest.approx(
        whole * gpu_runs.HIERNET_STAGE_SHARE["hiernet"]
    )
    # 12 minutes: the whole n = 7 run (13.5 alone) is skipped, the parked one starts and says from where.
    assert "skip hiernet_cifar100_n7_elu" in "\n".join(gpu_runs.plan(["hiernet_cifar100_n7_elu"], 12, 2))
    plan = "\n".join(gpu_runs.plan(["hiernet_cifar100_n7"], 12, 2))
    assert "start hiernet_cifar100_n7 (resumes after its parked backbone)" in plan


def test_plan_starts_a_park_job_that_cannot_finish_and_names_the_stages_it_lands(tmp_path, monkeypatch):
    gpu_runs = load("gpu_runs")
    monkeypatch.setattr(gpu_runs, "PARKED", tmp_path)  # nothing parked
    # Two sharing: a job takes (1 + 1/3) / 2 of its alone-at-four minutes; n = 9: 35 min in all, its
    # backbone 0.36 of that (8.4 here); n = 18's backbone 13.2, past the 12 minutes.
    names = ["hiernet_cifar100_n9_elu", "hiernet_cifar100_n18"]
    lines = gpu_runs.plan(names, 12, 2)
    assert all("skip" in line for line in lines[:2])  # without --park neither would land
    lines = gpu_runs.plan(names, 12, 2, park=names)
    # With --control the control stage (backbone-sized, 7.0 min alone here) ends before HierNet's.
    control = "\n".join(gpu_runs.plan(["hiernet_cifar100_n9_seed2"], 20, 1, park=["hiernet_cifar100_n9_seed2"]))
    assert "parks backbone by 6.3, control by 13.3" in control
    backbone = gpu_runs.HIERNET_MINUTES[9] * gpu_runs.HIERNET_STAGE_SHARE["backbone"] * (1 + 1 / 3) / 2
    assert backbone == pytest.approx(8.4)
    assert lines[0] == (
        f"  0.0 start hiernet_cifar100_n9_elu: needs about 23 min, runs to the end; parks backbone by {backbone:.1f}"
    )
    assert lines[1].endswith("runs to the end; no stage finishes by then: parks nothing")
    assert lines[-1] == " 12.0 all done; 0 slot-minutes idle of 2 x 12.0"
    # The stages' minutes add up to the whole job's expected length.
    assert sum(m for _, m in gpu_runs.stages_left("hiernet_cifar100_n9_seed2", 2)) == pytest.approx(
        gpu_runs.expected_minutes("hiernet_cifar100_n9_seed2", 2)
    )


TRIED_RUN = """
import pathlib, sys, time
seconds, rest, run_dir = sys.argv[1], float(sys.argv[2]), pathlib.Path(sys.argv[sys.argv.index("--out-dir") + 1])
run_dir.mkdir(parents=True)
print("[fake] epoch 1/4 loss 1 | 9.0s ETA 0:27", flush=True)  # the first epoch (compilation): not read
for epoch in (2, 3):
    time.sleep(1.5)
    print(f"[fake] epoch {epoch}/4 loss 1 | {seconds}s ETA 0:00", flush=True)
time.sleep(rest)
(run_dir / "metrics.json").write_text("{}")
"""


SLOW_CLOCK_RUN = """
import pathlib, sys, time
run_dir = pathlib.Path(sys.argv[sys.argv.index("--out-dir") + 1])
run_dir.mkdir(parents=True)
for epoch in range(1, 4001):  # each epoch's line claims a millisecond; the clock says a tenth of a second
    time.sleep(0.1)
    print(f"[fake] epoch {epoch}/4000 loss 1 | 0.001s ETA 0:00", flush=True)
(run_dir / "metrics.json").write_text("{}")
"""


def test_a_tried_job_is_timed_by_the_clock_once_its_epochs_span_long_enough(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    # 60 epochs read 132 s apart: 2.2 s an epoch by the clock, whatever the lines' own seconds say.
    assert gpu_runs.wall_seconds_left({2: 1000.0, 30: 1061.6, 62: 1132.0}, 800) == pytest.approx(2.2 * 738)
    assert gpu_runs.wall_seconds_left({2: 1000.0, 40: 1080.0}, 800) is None  # 80 s: a 2-s poll is too coarse
    assert gpu_runs.wall_seconds_left({2: 1000.0}, 800) is None
    lines = "".join(f"[x] epoch {e}/800 loss 3 | 2.0s ETA 1:00:00\n" for e in range(2, 63))
    (tmp_path / "a.log").write_text(lines)
    seen = {2: 1000.0}
    own, wall = gpu_runs.tried_seconds_left(tmp_path / "a.log", seen, 1132.0)
    assert own == pytest.approx(2.0 * 738) and wall == pytest.approx(2.2 * 738)
    assert seen == {2: 1000.0, 62: 1132.0}  # the last line, stamped when first read
    own, wall = gpu_runs.tried_seconds_left(tmp_path / "a.log", {}, 0.0)
    assert own == pytest.approx(2.0 * 738) and wall is None  # no span yet
    # On the queue: the lines' seconds say 4 s are left, the clock 400; the budget's 300 s would end it
    # at the deadline. Timed by the clock (a 1-s span here) it is dropped within seconds.
    script = tmp_path / "slow_clock_run.py"
    script.write_text(SLOW_CLOCK_RUN)
    gpu_runs.WALL_SPAN_SECONDS = 1.0
    gpu_runs.JOBS, gpu_runs.AFTER, runs = {"slow": [str(script)]}, {}, tmp_path / "runs"
    t0 = time.time()
    gpu_runs.main(["--no-mps", "--runs-dir", str(runs), "--budget", "300", "--parallel", "1", "--try", "slow"])
    assert json.loads((runs / "slow.run.json").read_text())["calls"][0]["status"] == "dropped (ETA past the deadline)"
    out = capsys.readouterr().out
    assert "stop slow: needs" in out and time.time() - t0 < 60
    assert re.search(r"slow: \d+s left by its epochs' own seconds, \d+s by the clock", out)


def test_a_tried_job_is_stopped_once_its_eta_passes_the_deadline_and_frees_its_slot(tmp_path, capsys):
    gpu_runs = load("gpu_runs")
    script = tmp_path / "tried_run.py"
    script.write_text(TRIED_RUN)
    assert gpu_runs.seconds_left(gpu_runs.progress_lines(tmp_path / "no.log")) is None
    # The scripts' own ETA averages the first epoch's compilation in; the queue reads the epochs' seconds.
    lines = ["epoch 1/800 loss 3 | 60.0s ETA 13:18:00", "epoch 2/800 loss 3 | 2.5s ETA 6:45:41"]
    lines += ["epoch 3/800 loss 3 | 2.0s ETA 4:31:20", "epoch 4/800 loss 3 | 2.1s ETA 3:24:00", "train done"]
    (tmp_path / "a.log").write_text("".join(f"[x] {line}\n" for line in lines))
    assert gpu_runs.seconds_left(gpu_runs.progress_lines(tmp_path / "a.log")) == pytest.approx(
        2.1 * 796
    )  # median of 2.5, 2.0, 2.1
    (tmp_path / "b.log").write_text("".join(f"[x] {line}\n" for line in lines[:2]))
    assert (
        gpu_runs.seconds_left(gpu_runs.progress_lines(tmp_path / "b.log")) is None
    )  # the first epoch holds compilation; one is no measure
    # An epoch's seconds (one epoch left after the third), then how long the job goes on.
    jobs = {"late": ["3723", "120"], "in_time": ["2", "0.5"], "next": ["3600", "0.5"]}
    gpu_runs.JOBS = {name: [str(script), *job] for name, job in jobs.items()}
    gpu_runs.AFTER, runs = {}, tmp_path / "runs"
    argv = ["--no-mps", "--runs-dir", str(runs), "--budget", "300", "--parallel", "1", "--try", "late", "in_time"]
    t0 = time.time()
    gpu_runs.main([*argv, "--only", "late", "in_time", "next"])
    out = capsys.readouterr().out
    calls = {name: json.loads((runs / f"{name}.run.json").read_text())["calls"] for name in gpu_runs.JOBS}
    assert calls["late"][0]["status"] == "dropped (ETA past the deadline)"
    assert "stop late: needs 3723s more, past the deadline" in out
    assert not (runs / "late" / "metrics.json").exists()
    assert calls["in_time"][0]["status"] == "done"
    assert calls["next"][0]["status"] == "done"  # not tried: its progress is not read
    assert time.time() - t0 < 100  # the late job's two minutes were cut short, its slot freed
