"""bench.py: training images/s three ways, in one run.

    (a) usual: torchvision DataLoader (PIL transforms: pad-4 random crop, flip, ToTensor,
        Normalize; worker processes, pinned memory), eager fp32 model;
    (b) ours:  common.GpuLoader (uint8 data on the GPU, augmentation there) feeding
        common.make_train_step (bf16 autocast, channels_last, the step as one CUDA graph);
    (c) ceiling: the same step as (b) on one random batch already on the GPU (model only).

Command (the README's table):
    python bench.py --config resnet56:128 --config resnet56:512 --config vgg16:128 --out results/bench.json

HierNet (`--hiernet`): training images/s of hiernet.py's model, per-branch modules vs the
batched form, with 8 and 20 equal-as-possible groups of 100 classes at n = 9 (split 16, 5
extra blocks: the paper's n = 9 settings), random 32x32 batches of 128, one CUDA graph per step:
    python bench.py --hiernet --out results/bench_hiernet.json
CPU smoke: python bench.py --hiernet --hiernet-n 1 --hiernet-split 1 --hiernet-extra 1 \
    --image-size 8 --batch 8 --steps 2 --warmup 1 --device cpu --out /tmp/bench_hiernet.json

The images are CIFAR-10's when --data-dir holds them (any pickle copy), else random uint8
images of the same shape: the throughput does not depend on the pixel values.

--mps K [K ...]: the total training images/s of K processes sharing the GPU (through MPS when its
control daemon runs, else time-sliced), each running (b) on its own model for --steps steps after
--warmup; the K processes start timing together, and the total is their images over the wall time
of the slowest (--compile: each model compiled, as the queued jobs). Writes --mps-out with whether the
MPS daemon was found:
    python bench.py --mps 1 2 4 --mps-config preact164:128 --mps-config densenet100:128
    python bench.py --mps 1 2 4 --mps-config resnet18in:64 --compile --mps-out results/bench_mps_hdl.json
    python bench.py --mps 1 2 --mps-config resnet18cifar:64 --compile --mps-out results/bench_mps_hdl_cifar_stem.json
HDL (`--hdl-step`): hdl_stack.py's compiled train step on CIFAR-100 (ResNet-18, 3x3 stem, the level stacks,
eq. 5's loss, fused Adam, one random batch, one CUDA graph), the model compiled alone against the model and its
loss compiled as one function (what hdl_stack.py's --compile does), in one run:
    python bench.py --hdl-step --batch 64 --steps 2000 --out results/bench_hdl_step.json
Every result file records the command, the wall time and the code's git commit (this checkout's HEAD, or
--commit SHA on a machine whose copy of the checkout has no .git of its own).
--mps-optimizer NAME...: each row's steps with each optimizer in turn (sgd, the default; adam, hdl_stack.py's
common.make_adam, fused on CUDA; adam_foreach, Adam's multi-tensor form, the baseline it replaced):
    python bench.py --mps 1 --mps-config resnet18cifar:64 --mps-optimizer adam_foreach adam --steps 3000 \
        --mps-out results/bench_mps_adam.json
"""

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import hdl_stack
import hiernet
import merged_resnet

BACKBONES = {
    "resnet20": lambda: common.CifarResNet(3, 10),
    "resnet56": lambda: common.CifarResNet(9, 10),
    "resnet110": lambda: common.CifarResNet(18, 10),
    "vgg16": lambda: common.VGG(16, 10),
    "preact164": lambda: merged_resnet.PreActResNetCifar(164, 10),
    "densenet100": lambda: merged_resnet.DenseNetBC(100, 12, 10),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, help="backbone:batch, e.g. resnet56:128 (repeatable)")
    p.add_argument("--steps", type=common.positive_int, default=200, help="timed steps per measurement")
    p.add_argument("--warmup", type=common.nonneg_int, default=30, help="untimed steps first")
    p.add_argument(
        "--workers", type=common.nonneg_int, default=min(8, os.cpu_count() or 1), help="DataLoader workers for (a)"
    )
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--device", type=common.device_name, default="auto")
    p.add_argument("--modes", default="usual,ours,ceiling")
    p.add_argument("--out", default=None, help="default results/bench.json (results/bench_hiernet.json with --hiernet)")
    h = p.add_argument_group("hiernet")
    h.add_argument("--hiernet", action="store_true", help="HierNet training images/s, per-branch vs batched")
    h.add_argument("--hiernet-n", type=common.positive_int, default=9, help="CIFAR ResNet size of the HierNet")
    h.add_argument("--hiernet-split", type=common.positive_int, default=16, help="residual blocks in the trunk")
    h.add_argument("--hiernet-extra", type=common.nonneg_int, default=5, help="extra blocks of the super-class node")
    h.add_argument("--groups", type=common.positive_int, nargs="+", default=[8, 20], help="group counts (100 classes)")
    h.add_argument("--batch", type=common.positive_int, default=128, help="training batch")
    h.add_argument("--image-size", type=common.positive_int, default=32)
    h.add_argument(
        "--compile",
        nargs="?",
        const="whole",
        default=None,
        choices=("whole", "regional"),
        help="torch.compile each model (then CUDA-graphed, as the scripts); 'regional': each residual block",
    )
    h.add_argument("--batched-only", action="store_true", help="skip the per-branch reference form")
    p.add_argument("--hdl-step", action="store_true", help="hdl_stack.py's step: model compiled vs model and loss")
    p.add_argument(
        "--mps", type=common.positive_int, nargs="+", default=None, metavar="K", help="K training processes at once"
    )
    p.add_argument("--mps-config", action="append", default=None, help="backbone:batch for --mps (repeatable)")
    p.add_argument(
        "--mps-optimizer",
        nargs="+",
        default=["sgd"],
        choices=tuple(MPS_OPTIMIZERS),
        help="the step's optimizer for --mps, each measured in turn (adam: common.make_adam, as hdl_stack.py)",
    )
    p.add_argument("--mps-out", default="results/bench_mps.json")
    p.add_argument("--mps-worker", default=None, help=argparse.SUPPRESS)  # one of the K processes
    p.add_argument("--commit", type=common.nonempty, help="the clean commit of the code, where its .git is not its own")
    args = p.parse_args(argv)
    args.command = "python bench.py " + shlex.join(sys.argv[1:] if argv is None else argv)  # recorded with the result
    args.started = time.time()
    default_out = "results/bench_hiernet.json" if args.hiernet else "results/bench.json"
    args.out = args.out or ("results/bench_hdl_step.json" if args.hdl_step else default_out)
    args.config = args.config or ["resnet56:128", "resnet56:512", "vgg16:128"]
    for flag, path in (("--out", args.out), ("--mps-out", args.mps_out)):  # before minutes of timing, not after
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if Path(path).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            p.error(f"{flag} {path}: cannot write a file there (a folder of that name, or no writable folder)")
    return args


class PILDataset(torch.utils.data.Dataset):
    """CIFAR the usual way: uint8 HWC arrays turned into PIL images and transformed per item."""

    def __init__(self, images_hwc, labels, transform):
        self.images, self.labels, self.transform = images_hwc, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def provenance(args):
    """What a result file records of how it was made: the command, the code's git commit (--commit where
    the checkout's .git is not the code's own, else this checkout's HEAD and whether it had uncommitted
    changes) and the wall time since the command started."""
    commit, dirty = args.commit, False
    if commit is None:  # this checkout's HEAD, where it is a git checkout
        git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=Path(__file__).parent)
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = bool(git("status", "--porcelain").stdout.strip()) if commit else None
    return {
        "command": args.command,
        "git_commit": commit,
        "git_dirty": dirty,
        "wall_seconds": round(time.time() - args.started, 1),
    }


def load_images(data_dir):
    try:
        train, _, _ = common.load_cifar10(data_dir)
        return train.images, train.labels, "CIFAR-10 (pickles under --data-dir)"
    except SystemExit:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g)
        return images, torch.randint(0, 10, (50000,), generator=g), "random uint8 32x32 images"


def time_steps(run_step, steps, warmup, device):
    for _ in range(warmup):
        run_step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    t0 = time.perf_counter()
    for _ in range(steps):
        run_step()
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    return time.perf_counter() - t0


def bench_usual(name, batch, images, labels, args, device):
    import torchvision.transforms as T

    mean, std = common.channel_stats(images)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    ds = PILDataset(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), transform)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
    )
    model = BACKBONES[name]().to(device)
    opt = common.make_sgd(model.parameters(), 0.1)
    batches = iter(loader)

    def run_step():
        nonlocal batches
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()  # the usual loop logs the loss every step

    seconds = time_steps(run_step, args.steps, args.warmup, device)
    return args.steps * batch / seconds


def loader_steps(step, loader, device):
    """(run_step, total): run_step() does one train step on the loader's next batch, cycling
    through its epochs; total() is the sum of the losses, kept on the device (read once, after
    timing, so that no step waits for the host)."""
    state = {"batches": iter(loader), "total": torch.zeros((), device=device)}

    def run_step():
        try:
            x, y = next(state["batches"])
        except StopIteration:
            state["batches"] = iter(loader)
            x, y = next(state["batches"])
        state["total"] = state["total"] + step(x, y)["loss"]

    return run_step, lambda: state["total"]


def bench_ours(name, batch, images, labels, args, device, ceiling=False):
    mean, std = common.channel_stats(images)
    model = common.to_device_model(BACKBONES[name](), device)
    opt = common.make_sgd(model.parameters(), 0.1)
    step = common.make_train_step(model, common.cross_entropy_loss, opt, device=device, cuda_graph=True)
    loader = common.GpuLoader(
        images, labels, batch, device=device, mean=mean, std=std, train=True, crop_pad=4, flip=True
    )
    if ceiling:
        x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        loader = [(x, y)]  # the same batch, again and again
    run_step, total = loader_steps(step, loader, device)
    seconds = time_steps(run_step, args.steps, args.warmup, device)
    if not torch.isfinite(total()):
        common.fail(f"bench {name}: non-finite loss")
    return args.steps * batch / seconds


def compile_arg(args):
    """make_train_step's compile for --compile: the whole model, or every residual block."""
    blocks = (common.CifarBasicBlock, hiernet.GroupedBlock, hiernet.TreeNode)
    return {None: False, "whole": True, "regional": blocks}[args.compile]


def timed_first_steps(step, x, y, device):
    """Seconds of the first three steps plus the graph capture (compilation happens there)."""
    t0 = time.perf_counter()
    for _ in range(4):
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def random_batch_step(model, loss_fn, args, device):
    """A model's train step (the scripts' make_train_step, --compile as given) on one random batch
    of 100 classes, after its first steps: (step, x, y, seconds of the first steps)."""
    model = common.to_device_model(model, device).train()
    opt = common.make_sgd(model.parameters(), 0.1)
    step = common.make_train_step(
        model, loss_fn, opt, device=device, cuda_graph=device.type == "cuda", compile=compile_arg(args)
    )
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (args.batch,), device=device)
    return step, x, y, timed_first_steps(step, x, y, device)


def batch_images_per_s(step, x, y, args, device, what):
    """Training images/s of a train step replayed on one batch (--warmup untimed steps, then --steps); a
    non-finite loss is one line."""
    run_step, total = loader_steps(step, [(x, y)], device)
    seconds = time_steps(run_step, args.steps, args.warmup, device)
    if not torch.isfinite(total()):
        common.fail(f"bench {what}: non-finite loss")
    return args.steps * len(x) / seconds


def bench_hiernet_step(model, args, device):
    """Training images/s of one HierNet form: hiernet.py's loss and step on one random batch."""
    step, x, y, first = random_batch_step(model, hiernet.hiernet_loss, args, device)
    return batch_images_per_s(step, x, y, args, device, "hiernet"), first


def bench_hiernet(args, device):
    """Per-branch vs batched HierNet training images/s, and the backbone's, per group count."""
    n_blocks = 3 * args.hiernet_n
    if not 1 <= args.hiernet_split < n_blocks or not 0 <= args.hiernet_extra <= n_blocks - args.hiernet_split:
        common.fail(
            f"--hiernet-split {args.hiernet_split} / --hiernet-extra {args.hiernet_extra} do not fit n={args.hiernet_n}"
        )
    backbone = common.CifarResNet(args.hiernet_n, 100)
    rows = [{"model": "backbone", "groups": 0, "images_per_s": None}]
    common.seed_everything(0)
    step, x, y, rows[0]["first_steps_s"] = random_batch_step(
        copy.deepcopy(backbone), common.cross_entropy_loss, args, device
    )
    rows[0]["images_per_s"] = args.steps * args.batch / time_steps(lambda: step(x, y), args.steps, args.warmup, device)
    print(
        f"backbone n={args.hiernet_n}: {rows[0]['images_per_s']:.0f} images/s "
        f"(first 4 steps, compilation included: {rows[0]['first_steps_s']:.1f} s)",
        flush=True,
    )
    for groups in args.groups:
        tree = [g.tolist() for g in np.array_split(np.random.default_rng(0).permutation(100), groups)]
        split, extra = [args.hiernet_split], [args.hiernet_extra]
        row = {"model": "hiernet", "groups": groups, "group_sizes": [len(g) for g in tree]}
        row["batched"], row["batched_first_steps_s"] = bench_hiernet_step(
            hiernet.build_hiernet(backbone, tree, split, extra), args, device
        )
        row["batched_epoch_s"] = 390 * 128 / row["batched"]  # seconds per CIFAR epoch (390 steps of 128)
        if args.batched_only:
            print(
                f"hiernet {groups} groups: batched {row['batched']:.0f} images/s "
                f"(first 4 steps: {row['batched_first_steps_s']:.1f} s)",
                flush=True,
            )
        else:
            row["per_branch"], _ = bench_hiernet_step(
                hiernet.build_per_branch(backbone, tree, split, extra), args, device
            )
            row["batched_over_per_branch"] = row["batched"] / row["per_branch"]
            row["per_branch_epoch_s"] = 390 * 128 / row["per_branch"]
            print(
                f"hiernet {groups} groups: per-branch {row['per_branch']:.0f}, batched {row['batched']:.0f} images/s "
                f"({row['batched_over_per_branch']:.2f}x; epoch {row['per_branch_epoch_s']:.1f} s -> "
                f"{row['batched_epoch_s']:.1f} s)",
                flush=True,
            )
        rows.append(row)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "n": args.hiernet_n,
        "split": args.hiernet_split,
        "extra_blocks": args.hiernet_extra,
        "batch": args.batch,
        "image_size": args.image_size,
        "compile": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": rows,
        **provenance(args),
    }
    common.write_json(args.out, result)
    return result


def bench_hdl_step(args, device):
    """hdl_stack.py's training images/s on CIFAR-100 with --compile: the model compiled alone (the loss's
    cross-entropies, centre loss and statistics as kernels of their own) against the model and loss as one."""
    # The model and loss of hdl_stack.py's defaults on CIFAR-100 (Table 3's setting), through its own builders,
    # with its levels: the WordNet table's categories (make_levels reads the data's name and class names only).
    hdl = hdl_stack.get_args(["--dataset", "cifar100", "--compile"])
    levels = hdl_stack.make_levels(argparse.Namespace(name="cifar100", class_names=hdl_stack.CIFAR100_CLASSES), hdl)
    hidden_sizes = hdl_stack.stack_hidden_sizes(hdl.stack_hidden, hdl, levels)
    lambdas = hdl_stack.level_weights(hdl, levels)
    loss_fn = hdl_stack.make_hdl_loss_fn(
        hdl.lambda_center, hdl.lambda_fine, lambdas, hdl.center_update, hdl.center_alpha, hdl.center_features
    )
    graph = device.type == "cuda"
    rows = []
    for compile_loss in (False, True):
        common.seed_everything(0)
        torch._dynamo.reset()
        model = hdl_stack.build_model(hdl, 100, levels, hidden_sizes, device, with_stacks=True).train()
        opt = common.make_adam(model.parameters(), hdl.lr, device=device)
        step = common.make_train_step(
            model, loss_fn, opt, device=device, cuda_graph=graph, compile=True, compile_loss=compile_loss
        )
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
        x = x.contiguous(memory_format=torch.channels_last) if graph else x
        fine = torch.randint(0, 100, (args.batch,), device=device)
        y = (fine, *(level.labels(fine.cpu()).to(device) for level in levels))
        first = timed_first_steps(step, x, y, device)
        per_s = batch_images_per_s(step, x, y, args, device, "hdl-step")
        compiled = "model and loss" if compile_loss else "model"
        rows.append({"compiled": compiled, "images_per_s": per_s, "first_steps_s": first})
        print(f"hdl step, {compiled} compiled: {rows[-1]['images_per_s']:.0f} images/s", flush=True)
    rows[1]["over_model_alone"] = rows[1]["images_per_s"] / rows[0]["images_per_s"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {"device": device_name, "torch": torch.__version__, "batch": args.batch, "image_size": args.image_size}
    result.update(steps=args.steps, warmup=args.warmup, rows=rows, **provenance(args))
    result["levels"] = {level.name: level.num_classes for level in levels}
    common.write_json(args.out, result)
    return result


# ---------------------------------------------------------------------------------------
# K training processes sharing the GPU (MPS)
# ---------------------------------------------------------------------------------------

MPS_BACKBONES = {  # CIFAR-100's 100 classes, as in the sweeps
    "preact164": lambda: merged_resnet.PreActResNetCifar(164, 100),
    "densenet100": lambda: merged_resnet.DenseNetBC(100, 12, 100),
    "resnet18in": lambda: hdl_stack.ResNet18(100, stem="imagenet"),  # hdl_stack.py's (batch 64: latency-bound)
    "resnet18cifar": lambda: hdl_stack.ResNet18(100, stem="cifar"),  # hdl_stack.py --stem cifar
    "preact11": lambda: merged_resnet.PreActResNetCifar(11, 100),  # tiny, for a CPU smoke test
}
MPS_CONFIGS = ["preact164:128", "densenet100:128"]
MPS_OPTIMIZERS = {  # (parameters, device) -> the optimizer the timed steps take
    "sgd": lambda params, device: common.make_sgd(params, 0.1),  # the ResNet and VGG scripts'
    "adam": lambda params, device: common.make_adam(params, 0.001, device=device),  # hdl_stack.py's
    # Adam's multi-tensor form, graph-safe: what make_adam gave before it was fused (the baseline)
    "adam_foreach": lambda params, device: torch.optim.Adam(params, lr=0.001, capturable=device.type == "cuda"),
}


def mps_status():
    """Whether the MPS control daemon and server run (by process name) and whether this process's
    clients will find the daemon's pipe (CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps)."""
    names = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv0 = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:  # the process ended meanwhile, or is not ours to read
                continue
            names.add(os.path.basename(argv0))
    pipe_dir = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    daemon = "nvidia-cuda-mps-control" in names
    pipe = os.path.exists(os.path.join(pipe_dir, "control"))
    return {
        "control_daemon_running": daemon,
        "server_running": "nvidia-cuda-mps-server" in names,
        "pipe_directory": pipe_dir,
        "pipe_found": pipe,
        "clients_use_mps": daemon and pipe,
    }


def mps_worker(args):
    """One of the K processes: warm up, say READY, wait for the go line on stdin, time the steps,
    print RESULT {start, end, images} (wall-clock seconds, comparable across processes)."""
    name, batch, rank, optimizer = args.mps_worker.split(":")
    batch, rank = int(batch), int(rank)
    common.seed_everything(rank)
    device = common.get_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(rank)
    n = min(50000, batch * (args.steps + args.warmup))
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 100, (n,), generator=g)
    model = common.to_device_model(MPS_BACKBONES[name](), device)
    opt = MPS_OPTIMIZERS[optimizer](model.parameters(), device)
    step = common.make_train_step(model, common.cross_entropy_loss, opt, device=device, compile=bool(args.compile))
    loader = common.GpuLoader(
        images, labels, batch, device=device, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, crop_pad=4, flip=True
    )
    run_step, total = loader_steps(step, loader, device)
    for _ in range(args.warmup):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.time()
    for _ in range(args.steps):
        run_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.time()
    if not torch.isfinite(total()):
        common.fail(f"bench {name}: non-finite loss")
    print("RESULT " + json.dumps({"start": start, "end": end, "images": args.steps * batch}), flush=True)


def read_tagged_line(proc, tag):
    """The payload of proc's first stdout line starting with tag (other lines are echoed); None if it exits first."""
    for line in proc.stdout:
        if line.startswith(tag):
            return line[len(tag) :].strip()
        print(line, end="", flush=True)
    return None


def run_processes(config, k, args, optimizer="sgd"):
    """Start k workers, let them warm up, start their timed steps together; one row of results."""
    name, batch = config.split(":")
    command = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps)]
    command += ["--warmup", str(args.warmup), "--device", args.device]
    command += ["--compile", args.compile] if args.compile else []
    procs = [
        subprocess.Popen(
            command + ["--mps-worker", f"{name}:{batch}:{rank}:{optimizer}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(k)
    ]
    try:
        for proc in procs:
            if read_tagged_line(proc, "READY") is None:
                common.fail(
                    f"bench --mps {name}:{batch} x{k}: a worker exited with status {proc.wait()} before its steps"
                )
        for proc in procs:  # the go line, to every worker at once
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = [read_tagged_line(proc, "RESULT ") for proc in procs]
        if None in results:
            common.fail(f"bench --mps {name}:{batch} x{k}: a worker exited without a result")
    except BaseException:
        for proc in procs:  # stop the workers started here, none other
            if proc.poll() is None:
                proc.kill()
        raise
    finally:
        for proc in procs:
            proc.wait()
    results = [json.loads(r) for r in results]
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    images = sum(r["images"] for r in results)
    return {
        "backbone": name,
        "batch": int(batch),
        "optimizer": optimizer,
        "k": k,
        "total_images_per_s": images / wall,
        "per_process_images_per_s": [r["images"] / (r["end"] - r["start"]) for r in results],
        "images": images,
        "wall_s": wall,
        "start_spread_s": max(r["start"] for r in results) - min(r["start"] for r in results),
    }


def bench_mps(args):
    if args.compile == "regional":
        common.fail("bench --mps: --compile regional is not measured with --mps; give --compile (whole models)")
    mps = mps_status()
    device = common.get_device(args.device)
    print(f"MPS: {mps}", flush=True)
    configs = args.mps_config or MPS_CONFIGS
    for config in configs:  # every one checked before the first is measured
        name, _, batch = config.partition(":")
        if name not in MPS_BACKBONES or not batch.isdigit() or int(batch) < 1:
            common.fail(
                f"--mps-config {config!r}: want backbone:batch (batch at least 1), backbone one of "
                f"{', '.join(MPS_BACKBONES)}"
            )
    rows = []
    for config in configs:
        name, _, batch = config.partition(":")
        for optimizer in args.mps_optimizer:
            single = None
            for k in args.mps:  # each at least 1 (its argparse type)
                row = run_processes(config, k, args, optimizer)
                single = row["total_images_per_s"] if k == 1 else single
                row["total_over_one"] = row["total_images_per_s"] / single if single else None
                rows.append(row)
                print(
                    f"{name} batch {batch} {optimizer} x{k}: {row['total_images_per_s']:.0f} images/s in all",
                    flush=True,
                )
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "mps": mps,
        "mps_after": mps_status(),  # the server starts with the first client
        "images": "random uint8 32x32 images, 100 classes",
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": bool(args.compile),
        "rows": rows,
        **provenance(args),
    }
    common.write_json(args.mps_out, result)
    print(f"\n{device_name}, torch {torch.__version__}, MPS daemon {'on' if mps['clients_use_mps'] else 'off'}")
    print(f"{'backbone':<14}{'batch':>6}{'optimizer':>14}{'k':>4}{'images/s':>10}{'x one':>7}")
    for r in rows:
        ratio = r["total_over_one"]
        print(
            f"{r['backbone']:<14}{r['batch']:>6}{r['optimizer']:>14}{r['k']:>4}{r['total_images_per_s']:>10.0f}"
            f"{ratio or float('nan'):>7.2f}"
        )
    return result


def main(argv=None):
    args = get_args(argv)
    if args.mps_worker:
        return mps_worker(args)
    if args.mps:
        return bench_mps(args)
    common.seed_everything(0)
    device = common.get_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.hiernet:
        return bench_hiernet(args, device)
    if args.hdl_step:
        return bench_hdl_step(args, device)
    images, labels, source = load_images(args.data_dir)
    modes = args.modes.split(",")
    rows = []
    for config in args.config:
        name, batch = config.split(":")
        batch = int(batch)
        if name not in BACKBONES:
            common.fail(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
        row = {"backbone": name, "batch": batch}
        for mode in modes:
            if mode == "usual":
                row["usual"] = bench_usual(name, batch, images, labels, args, device)
            elif mode == "ours":
                row["ours"] = bench_ours(name, batch, images, labels, args, device)
            elif mode == "ceiling":
                row["ceiling"] = bench_ours(name, batch, images, labels, args, device, ceiling=True)
            print(f"{name} batch {batch} {mode}: {row[mode]:.0f} images/s", flush=True)
        if "usual" in row and "ours" in row:
            row["ours_over_usual"] = row["ours"] / row["usual"]
        if "ceiling" in row and "ours" in row:
            row["ours_over_ceiling"] = row["ours"] / row["ceiling"]
        rows.append(row)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": device_name,
        "torch": torch.__version__,
        "images": source,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "rows": rows,
        **provenance(args),
    }
    common.write_json(args.out, result)
    print(f"\n{device_name}, torch {torch.__version__}, {source}; images/s over {args.steps} steps")
    print(f"{'backbone':<12}{'batch':>6}{'usual':>10}{'ours':>10}{'ceiling':>10}{'ours/usual':>12}{'ours/ceil':>11}")
    for r in rows:
        cells = [f"{r.get(k, float('nan')):>10.0f}" for k in ("usual", "ours", "ceiling")]
        print(
            f"{r['backbone']:<12}{r['batch']:>6}{''.join(cells)}{r.get('ours_over_usual', float('nan')):>12.2f}"
            f"{r.get('ours_over_ceiling', float('nan')):>11.2f}"
        )
    return result


if __name__ == "__main__":
    main()
