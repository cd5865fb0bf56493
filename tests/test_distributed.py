"""Several processes on the CPU (gloo): a torchrun sweep splits merged's models without overlap,
and a ddp run of W processes at batch B trains exactly like one process at batch W x B."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import common
import merged_resnet as mr

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


@pytest.fixture(autouse=True)
def keep_thread_count():
    """Tests here run torch on one thread, as each worker process does; the tests after them keep
    the process's own count (CPU results, such as the golden runs', depend on it)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a ddp run against one process with the same global batch -----------------------------


class TinyNet(nn.Module):
    """No batch norm: a ddp rank's batch statistics would differ from the whole batch's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1))


def tiny_data():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 5, (96,), generator=g)
    return images, labels


def train_tiny(stage_dir, batch_size, epochs=2):
    """common's loop on TinyNet: SGD with momentum, crop and flip on, a learning-rate step."""
    torch.manual_seed(0)
    model = TinyNet()
    images, labels = tiny_data()
    loader = common.GpuLoader(
        images, labels, batch_size, device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, train=True, crop_pad=2, flip=True
    )
    optimizer = common.make_sgd(model.parameters(), lr=0.1)
    step = common.make_train_step(model, common.cross_entropy_loss, optimizer, device="cpu", dtype="fp32")
    lr_at = common.piecewise_lr([len(loader)], [0.1, 0.05])
    history = common.fit(
        stage_dir, model, optimizer, step, loader, epochs=epochs, lr_at=lr_at, log_path=Path(stage_dir) / "m.jsonl"
    )
    return model, history, len(loader)


def ddp_worker(rank, world, port, stage_dir, batch_size, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    device = common.init_distributed(torch.device("cpu"), mode="ddp")
    assert device.type == "cpu" and common.ddp_active() and common.world_size() == world
    model, history, batches = train_tiny(stage_dir, batch_size)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # A loss that uses a part of the model but never calls it would train unsynchronised ranks.
    parts_only = common.make_train_step(
        model, lambda m, x, y: m.fc.weight.square().sum(), common.make_sgd(model.parameters(), 0.1), device="cpu"
    )
    try:
        parts_only(*next(iter(common.GpuLoader(*tiny_data(), 4, device="cpu", mean=(0,) * 3, std=(1,) * 3))))
        refused = ""
    except SystemExit as e:
        refused = str(e.code)
    torch.save(
        {"state": state, "history": history, "batches": batches, "refused": refused}, Path(results) / f"rank{rank}.pt"
    )


def test_ddp_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    world, per_rank = 2, 8
    ddp_dir, results = tmp_path / "ddp", tmp_path / "results"
    results.mkdir()
    mp.spawn(ddp_worker, args=(world, free_port(), str(ddp_dir), per_rank, str(results)), nprocs=world)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(world)]

    torch.set_num_threads(1)
    model, history, batches = train_tiny(tmp_path / "single", world * per_rank)
    assert ranks[0]["batches"] == ranks[1]["batches"] == batches == 96 // (world * per_rank)
    # The same final weights on both ranks and in the single process (the same batches, the same
    # augmentation, gradients averaged over the ranks = the gradient of the whole batch).
    for name, weight in model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], weight, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.fc.weight, TinyNet().fc.weight)  # it did train
    # The logged epoch statistics cover every rank: the single process's loss and accuracy.
    for ddp_record, record in zip(ranks[0]["history"], history, strict=True):
        assert ddp_record["train_acc"] == pytest.approx(record["train_acc"], abs=1e-9)
        assert ddp_record["loss"] == pytest.approx(record["loss"], abs=1e-5)
    timings = ("seconds", "images_per_s")
    strip = [[{k: v for k, v in rec.items() if k not in timings} for rec in r["history"]] for r in ranks]
    assert strip[0] == strip[1]  # every rank logs the same record
    assert all("not the model itself" in r["refused"] for r in ranks)
    # Rank 0 alone wrote the checkpoint and the log: one line per epoch, not one per rank.
    assert (ddp_dir / "checkpoint.pt").is_file()
    assert len(common.read_jsonl(ddp_dir / "m.jsonl")) == 2


def test_sharded_loader_splits_each_global_batch_without_overlap():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    labels = torch.arange(50)

    def batches(batch_size, shard):
        loader = common.GpuLoader(
            images, labels, batch_size, device="cpu", mean=(0.0,), std=(1 / 255,), train=True, seed=3, shard=shard
        )
        return len(loader), [y for _, y in loader]

    n_whole, whole = batches(12, (0, 1))
    parts = [batches(4, (r, 3)) for r in range(3)]
    assert n_whole == 4 and all(n == 4 for n, _ in parts)  # 50 // 12 global batches on every rank
    for i, batch in enumerate(whole):
        assert torch.equal(torch.cat([p[1][i] for p in parts]), batch)
    with pytest.raises(SystemExit, match=r"3 x 20 per process"):
        common.GpuLoader(images, labels, 20, device="cpu", mean=(0.0,), std=(1.0,), train=True, shard=(0, 3))


# ---- a torchrun sweep: merged's models split over the processes ------------------------------


def torchrun_merged(flags):
    """merged_resnet.py under torchrun with 2 CPU processes (a sweep); fails the test on a non-zero exit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(ROOT / "merged_resnet.py"), *flags],
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_torchrun_sweep_trains_every_merged_model_once_and_rank0_builds_the_tables(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "shapes", "--train-size", "200", "--test-size", "60", "--image-size", "8", "--epochs", "1"]
    argv += ["--batch-size", "32", "--device", "cpu", "--eval-batch-size", "250", "--backbone", "densenet"]
    argv += ["--depth", "10", "--architectures", "separate", "merge-2", "--runs", "2", "--out-dir", str(out)]
    done = torchrun_merged(argv)
    trained = re.findall(r"\[((?:separate|merge-2)-r\d)\] seed", done.stdout)
    expected = {f"{a}-r{r}" for a in ("separate", "merge-2") for r in range(2)}
    assert sorted(trained) == sorted(expected)  # each model once: no overlap, none left out
    shares = mr.assign_tasks(["separate", "merge-2"], 2, 2)
    assert all(shares) and sum(len(s) for s in shares) == 4
    for architecture, run in (m for share in shares for m in share):
        assert mr.prediction_path(out, architecture, run).is_file()
    assert (out / "metrics.json").is_file() and "Paired t-tests" in (out / "summary.txt").read_text()
    saved = common.read_run_args(out)
    assert saved["tasks"] is None and saved["distributed"] == "sweep"


def test_torchrun_sweep_whose_processes_train_different_numbers_of_epochs_then_grows_a_run(tmp_path):
    """separate trains two networks, merge-2 one: the processes log different numbers of epochs
    (no per-epoch barrier between them, which broke the final one), and a resume with --runs 2
    trains run 1's models alone."""
    out = tmp_path / "run"
    argv = ["--dataset", "shapes", "--train-size", "128", "--test-size", "60", "--image-size", "8", "--epochs", "1"]
    argv += ["--batch-size", "32", "--device", "cpu", "--eval-batch-size", "250", "--dtype", "fp32", "--depth", "11"]
    argv += ["--architectures", "separate", "merge-2"]
    trained = []
    for flags in ([*argv, "--runs", "1", "--out-dir", str(out)], ["--resume", str(out), "--runs", "2"]):
        done = torchrun_merged(flags)
        trained.append(sorted(re.findall(r"\[((?:separate|merge-2)-r\d)\] seed", done.stdout)))
    assert trained == [["merge-2-r0", "separate-r0"], ["merge-2-r1", "separate-r1"]]
    assert "What 2 runs support" in (out / "summary.txt").read_text()


# ---- HDL's class centres under ddp ---------------------------------------------------------


class TinyBackbone(nn.Module):
    """hdl_stack.HDLNet's backbone interface (features(x), head.fc) without batch norm."""

    def __init__(self, num_fine=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Module()
        self.head.fc = nn.Linear(4, num_fine)

    def features(self, x):
        return F.relu(self.conv(x)).mean((2, 3))


def train_tiny_hdl(stage_dir, batch_size, rule):
    """Two epochs of HDL (centre loss, fine and two cascade level heads) on tiny data."""
    import hdl_stack

    torch.manual_seed(0)
    model = hdl_stack.HDLNet(TinyBackbone(), 5, level_sizes=(3, 2))
    images, fine = tiny_data()
    labels = (fine, fine % 3, fine % 2)
    loader = common.GpuLoader(images, labels, batch_size, device="cpu", mean=(0.5,) * 3, std=(0.25,) * 3, train=True)
    optimizer = common.make_sgd(model.parameters(), lr=0.1)
    loss_fn = hdl_stack.make_hdl_loss_fn(0.1, 1.0, [1.0, 1.0], center_update=rule, center_alpha=0.5)
    step = common.make_train_step(model, loss_fn, optimizer, device="cpu", dtype="fp32")
    common.fit(
        stage_dir,
        model,
        optimizer,
        step,
        loader,
        epochs=2,
        lr_at=lambda n: 0.1,
        on_epoch_end=lambda epoch, record: model.update_centers(1.0) if rule == "epoch" else None,
    )
    return model


def hdl_ddp_worker(rank, world, port, stage_dir, batch_size, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    common.init_distributed(torch.device("cpu"), mode="ddp")
    out = {}
    for rule in ("epoch", "wen", "sgd"):
        model = train_tiny_hdl(Path(stage_dir) / rule, batch_size, rule)
        out[rule] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(out, Path(results) / f"rank{rank}.pt")


def test_hdl_centres_under_ddp_equal_one_process_with_the_global_batch(tmp_path):
    world, per_rank = 2, 8
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(hdl_ddp_worker, args=(world, free_port(), str(tmp_path / "ddp"), per_rank, str(results)), nprocs=world)
    ranks = [torch.load(results / f"rank{r}.pt", weights_only=True) for r in range(world)]
    torch.set_num_threads(1)
    for rule in ("epoch", "wen", "sgd"):
        single = train_tiny_hdl(tmp_path / "single" / rule, world * per_rank, rule).state_dict()
        assert single["centers"].abs().sum() > 0, rule  # the centres moved
        for name, value in single.items():
            assert torch.equal(ranks[0][rule][name], ranks[1][rule][name]), (rule, name)
            torch.testing.assert_close(ranks[0][rule][name], value, atol=1e-5, rtol=1e-5, msg=f"{rule} {name}")


def test_sweep_processes_may_outnumber_the_gpus_ddp_processes_may_not():
    assert [common.process_gpu(r, 2, "sweep") for r in range(6)] == [0, 1, 0, 1, 0, 1]
    assert [common.process_gpu(r, 2, "ddp") for r in range(2)] == [0, 1]
    with pytest.raises(SystemExit, match="one process per GPU"):
        common.process_gpu(2, 2, "ddp")
