"""Measure what torchrun gains on a machine with several GPUs (README "Several GPUs").

    python tools/scaling.py --data-dir data --runs-dir /root/scaling --out results/scaling.json

Two measurements, each command timed from its start to its exit (process start, data loading
and compilation included) and read back from its run's metrics.jsonl:

- ddp, one run over the GPUs: `hdl_stack.py --method hdl` on CIFAR-100 for --epochs epochs, on
  one GPU (CUDA graph, the default; and eager, as each rank runs under ddp) and with torchrun on
  G GPUs at a per-GPU batch of 32 (global 64, the paper's batch) and of 64 (global 128). Images/s
  is the median over the epochs after the first (which holds the warm-up), all ranks' images.
- sweep, independent runs spread over the GPUs: `merged_resnet.py` with --sweep-models models
  (architectures x runs, --sweep-epochs epochs each) in one process on one GPU, then with
  torchrun over G GPUs (each process trains its share, rank 0 builds the tables), and with
  --sweep-per-gpu K, K processes per GPU (start the MPS daemon first).

Each command gets a fresh run directory under --runs-dir; its output goes to <name>.log there.
--out is rewritten after every measurement, so a call cut short keeps the rows it finished;
`--from-log LOG` rebuilds it from the rows a run printed (one JSON object per measurement).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def count(text):
    """argparse type: a whole number of at least 1 (GPUs, epochs, runs, processes)."""
    if not text.strip().lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want a whole number of at least 1")
    return int(text)


def torchrun(gpus):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "--"]


def timed(name, cmd, runs_dir, gpus):
    """Run cmd on the first `gpus` GPUs; returns (wall seconds, run directory). A failure stops here."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)), PYTHONUNBUFFERED="1")
    log = runs_dir / f"{name}.log"
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    seconds = time.time() - t0
    if rc != 0:
        sys.exit(f"error: {name} failed (exit {rc}); see {log}:\n" + "".join(log.read_text().splitlines(True)[-5:]))
    return seconds


def epoch_rate(run_dir):
    """Median images/s over the epochs after the first, and the epoch count, from metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["images_per_s"] for r in rows[1:]] or [r["images_per_s"] for r in rows]
    return statistics.median(rates), len(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=count, default=2, help="GPUs of the multi-GPU runs")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--runs-dir", default="runs/scaling")
    p.add_argument("--epochs", type=count, default=3, help="hdl_stack epochs per ddp measurement")
    p.add_argument("--sweep-epochs", type=count, default=2, help="merged_resnet epochs per model")
    p.add_argument("--sweep-depth", type=count, default=56, help="merged_resnet backbone depth")
    p.add_argument("--sweep-runs", type=count, default=2, help="merged_resnet runs per architecture")
    p.add_argument("--sweep-architectures", nargs="+", default=["separate", "merge-1"])
    p.add_argument("--sweep-per-gpu", type=count, default=1, help="also time this many sweep processes per GPU")
    p.add_argument("--skip", nargs="*", default=[], choices=("ddp", "sweep"))
    p.add_argument("--out", default="results/scaling.json")
    p.add_argument("--from-log", default=None, metavar="LOG", help="rebuild --out from a log's printed rows")
    p.add_argument("--device-name", default="NVIDIA H100 80GB HBM3", help="with --from-log: the GPU it ran on")
    p.add_argument("--torch", default=None, help="with --from-log: the torch version it ran with")
    a = p.parse_args(argv)
    if Path(a.out).is_dir() or (Path(a.out).parent.exists() and not Path(a.out).parent.is_dir()):
        p.error(f"--out {a.out}: cannot write a file there")
    if a.from_log and not Path(a.from_log).is_file():
        p.error(f"--from-log {a.from_log}: no such file")
    if a.from_log:
        from_log(a.from_log, a.out, a.device_name, a.torch, a.gpus)
        print(f"wrote {a.out}")
        return
    import torch

    if torch.cuda.device_count() < a.gpus:
        sys.exit(f"error: {a.gpus} GPUs asked for, {torch.cuda.device_count()} visible")
    runs_dir = Path(a.runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H%M%S")
    result = {
        "device": torch.cuda.get_device_name(0),
        "gpus": a.gpus,
        "torch": torch.__version__,
        "ddp": [],
        "sweep": [],
    }

    if "ddp" not in a.skip:
        hdl = ["hdl_stack.py", "--dataset", "cifar100", "--data-dir", a.data_dir, "--method", "hdl"]
        hdl += ["--epochs", str(a.epochs)]
        configs = [
            ("1gpu_graph_b64", 1, [sys.executable], ["--batch-size", "64"]),
            ("1gpu_eager_b64", 1, [sys.executable], ["--batch-size", "64", "--no-cuda-graph"]),
            (f"{a.gpus}gpu_ddp_b32", a.gpus, torchrun(a.gpus), ["--batch-size", "32"]),
            (f"{a.gpus}gpu_ddp_b64", a.gpus, torchrun(a.gpus), ["--batch-size", "64"]),
        ]
        for name, gpus, launcher, extra in configs:
            run_dir = runs_dir / f"hdl_{name}_{stamp}"
            seconds = timed(name, [*launcher, *hdl, *extra, "--out-dir", str(run_dir)], runs_dir, gpus)
            rate, epochs = epoch_rate(run_dir)
            per_gpu_batch = int(extra[1])
            row = {
                "name": name,
                "gpus": gpus,
                "per_gpu_batch": per_gpu_batch,
                "global_batch": per_gpu_batch * gpus,
                "cuda_graph": gpus == 1 and "--no-cuda-graph" not in extra,
                "epochs": epochs,
                "images_per_s": round(rate),
                "wall_seconds": round(seconds, 1),
                "command": " ".join(["torchrun ..." if gpus > 1 else "python", *hdl, *extra]),
            }
            result["ddp"].append(row)
            print(json.dumps(row), flush=True)
            write(result, a.out)

    if "sweep" not in a.skip:
        merged = ["merged_resnet.py", "--dataset", "cifar100", "--data-dir", a.data_dir]
        merged += ["--depth", str(a.sweep_depth), "--epochs", str(a.sweep_epochs), "--runs", str(a.sweep_runs)]
        merged += ["--architectures", *a.sweep_architectures]
        configs = [("1gpu", 1, [sys.executable]), (f"{a.gpus}gpu_sweep", a.gpus, torchrun(a.gpus))]
        if a.sweep_per_gpu > 1:  # more processes than GPUs (process r on GPU r mod G); MPS runs them side by side
            procs = a.gpus * a.sweep_per_gpu
            configs.append((f"{a.gpus}gpu_sweep_{procs}proc", a.gpus, torchrun(procs)))
        for name, gpus, launcher in configs:
            run_dir = runs_dir / f"merged_{name}_{stamp}"
            seconds = timed(f"merged_{name}", [*launcher, *merged, "--out-dir", str(run_dir)], runs_dir, gpus)
            row = {
                "name": name,
                "gpus": gpus,
                "processes": int(launcher[launcher.index("--nproc_per_node") + 1]) if gpus > 1 else 1,
                "models": len(a.sweep_architectures) * a.sweep_runs,
                "epochs_per_model": a.sweep_epochs,
                "wall_seconds": round(seconds, 1),
                "command": " ".join(["torchrun ..." if gpus > 1 else "python", *merged]),
            }
            result["sweep"].append(row)
            print(json.dumps(row), flush=True)
            write(result, a.out)
    print(f"wrote {a.out}")


def write(result, out):
    """The result so far, each kind's rows with their wall-time speed-up over its first row."""
    for kind in ("ddp", "sweep"):
        rows = result[kind]
        for r in rows:
            r["wall_speedup_vs_first"] = round(rows[0]["wall_seconds"] / r["wall_seconds"], 2)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".scaling-tmp")  # ours alone, never a user's *.tmp
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def from_log(log, out, device, torch_version, gpus):
    """Rebuild --out from the measurement rows printed in a log (a call that ended before the last)."""
    result = {"device": device, "gpus": gpus, "torch": torch_version, "ddp": [], "sweep": [], "from_log": str(log)}
    for line in Path(log).read_text().splitlines():
        try:
            row = json.loads(line) if line.startswith("{") else None
        except ValueError:  # a line cut short when the call ended
            continue
        if isinstance(row, dict) and "wall_seconds" in row:  # a measurement's row, as main prints it
            result["ddp" if "per_gpu_batch" in row else "sweep"].append(row)
    write(result, out)
    return result


if __name__ == "__main__":
    main()
