"""Bad inputs stop with one clear line and touch nothing.

Every case runs a script as a user would (`python script.py ...` from the repository root) in
its own temporary folder holding a sentinel file beside the run directory and one inside a
pre-existing data folder. Each must exit non-zero (2: argparse, refused before anything is
created; 1: common.fail), print exactly one error line after any usage lines, no traceback,
and leave every pre-existing file as it was. The cases run in a thread pool (each is mostly
Python and torch start-up) and each is reported as its own test.
"""

import argparse
import gzip
import importlib
import importlib.util
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import common

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# Writers of real-format data files (then damaged by the cases)
# ---------------------------------------------------------------------------------------


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _cifar_batch(n, label_keys):
    """Random images of every class in turn (first label key); the other keys: label // 5."""
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    first, *coarser = label_keys
    fine = rng.permutation(np.arange(n) % label_keys[first])
    batch[first] = fine.tolist()
    for key in coarser:
        batch[key] = (fine // 5).tolist()
    return batch


def cifar10_truncated(tmp):
    base = tmp / "data" / "cifar-10-batches-py"
    names = [n.encode() for group in common.CIFAR10_HIERARCHY.values() for n in group]
    _pickle(base / "batches.meta", {b"label_names": names})
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(base / name, _cifar_batch(20, {b"labels": 10}))
    _truncate(base / "data_batch_1")


def _cifar100(tmp):
    base = tmp / "data" / "cifar-100-python"
    _pickle(
        base / "meta",
        {
            b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"c{i}".encode() for i in range(20)],
        },
    )
    for part in ("train", "test"):
        _pickle(base / part, _cifar_batch(200, {b"fine_labels": 100, b"coarse_labels": 20}))
    return base


def cifar100_truncated(tmp):
    _truncate(_cifar100(tmp) / "train", keep=0.3)


def cifar100_wrong_shape(tmp):
    base = _cifar100(tmp)
    batch = _cifar_batch(200, {b"fine_labels": 100, b"coarse_labels": 20})
    batch[b"data"] = batch[b"data"][:, :1000]  # a valid pickle of the wrong content
    _pickle(base / "train", batch)


def _mnist(tmp):
    raw = tmp / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 20)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], dtype=">u4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = bytes([0, 0, 8, 1]) + np.array([n], dtype=">u4").tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return raw


def mnist_truncated(tmp):
    _truncate(_mnist(tmp) / "train-images-idx3-ubyte")


def mnist_gzipped_in_place(tmp):
    # A .gz copied over the unpacked name: the header is gzip's, not IDX's.
    path = _mnist(tmp) / "t10k-images-idx3-ubyte"
    path.write_bytes(gzip.compress(path.read_bytes()))


def _folder(tmp, classes=("cat", "dog")):
    from PIL import Image

    for part in ("train", "test"):
        for c in classes:
            d = tmp / "data" / part / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(d / f"{i}.png")
    return tmp / "data"


def folder_bad_image(tmp):
    (_folder(tmp) / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def folder_empty_class(tmp):
    (_folder(tmp) / "train" / "bird").mkdir()


def _npy(name, array):
    def write(tmp):
        np.save(tmp / name, np.asarray(array))

    return write


def _cpm_with(value):
    cpm = np.full((4, 4), 0.05)
    np.fill_diagonal(cpm, 0.85)
    cpm[1, 2] = value
    return cpm


GOOD_CPM = _cpm_with(0.05)


def write_text(name, text):
    def write(tmp):
        (tmp / name).write_text(text)

    return write


def both(*writers):
    def write(tmp):
        for w in writers:
            w(tmp)

    return write


# ---------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    script: str
    argv: list  # "{tmp}" stands for the case's folder
    code: int  # 2: argparse (nothing created), 1: common.fail
    expect: str  # a fragment the error line must contain
    prepare: object = None


SHAPES = ["--dataset", "shapes", "--train-size", "40", "--test-size", "40", "--image-size", "16"]
CASES = [
    # Impossible numbers and choices of the shared flags, in every training script.
    Case("hiernet-epochs-0", "hiernet.py", ["--epochs", "0"], 2, "--epochs"),
    Case("coarse-epochs-negative", "coarse_outer_product.py", ["--epochs", "-3"], 2, "--epochs"),
    Case("latent-epochs-0", "latent_string.py", ["--epochs", "0"], 2, "--epochs"),
    Case("merged-epochs-text", "merged_resnet.py", ["--epochs", "ten"], 2, "--epochs"),
    Case("hdl-epochs-negative", "hdl_stack.py", ["--epochs", "-1"], 2, "--epochs"),
    Case("merged-batch-size-0", "merged_resnet.py", ["--batch-size", "0"], 2, "--batch-size"),
    Case("hdl-batch-size-0", "hdl_stack.py", ["--batch-size", "0"], 2, "--batch-size"),
    Case("hiernet-lr-nan", "hiernet.py", ["--lr", "nan"], 2, "--lr"),
    Case("coarse-lr-inf", "coarse_outer_product.py", ["--lr", "inf"], 2, "--lr"),
    Case("latent-lr-negative", "latent_string.py", ["--lr", "-0.1"], 2, "--lr"),
    Case("merged-lr-0", "merged_resnet.py", ["--lr", "0"], 2, "--lr"),
    Case("hdl-seed-negative", "hdl_stack.py", ["--seed", "-1"], 2, "--seed"),
    Case("hiernet-device-gpu", "hiernet.py", ["--device", "gpu"], 2, "--device"),
    Case("coarse-image-size-0", "coarse_outer_product.py", ["--image-size", "0"], 2, "--image-size"),
    Case("latent-train-size-0", "latent_string.py", ["--train-size", "0"], 2, "--train-size"),
    Case("hdl-test-size-negative", "hdl_stack.py", ["--test-size", "-5"], 2, "--test-size"),
    Case("hdl-device-cuda-99", "hdl_stack.py", [*SHAPES, "--device", "cuda:99"], 1, "--device cuda:99"),
    # Each script's own flags.
    Case("hiernet-g-max-0", "hiernet.py", ["--g-max", "0"], 2, "--g-max"),
    Case("hiernet-p-min-negative", "hiernet.py", ["--p-min", "-1"], 2, "--p-min"),
    Case("hiernet-momentum-1.5", "hiernet.py", ["--momentum", "1.5"], 2, "--momentum"),
    Case("coarse-dropout-1", "coarse_outer_product.py", ["--dropout", "1"], 2, "--dropout"),
    Case("merged-val-fraction-1", "merged_resnet.py", ["--val-fraction", "1"], 2, "--val-fraction"),
    Case("hdl-center-alpha-2", "hdl_stack.py", ["--center-alpha", "2"], 2, "--center-alpha"),
    # grouping.py (the grouping command line): the same checks as hiernet.py, a CPM that is not one, outputs that collide.
    Case(
        "grouping-g-max-0",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy", "--g-max", "0"],
        2,
        "--g-max",
        _npy("cpm.npy", GOOD_CPM),
    ),
    Case(
        "grouping-p-min-negative",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy", "--p-min", "-1"],
        2,
        "--p-min",
        _npy("cpm.npy", GOOD_CPM),
    ),
    Case("grouping-cpm-nan", "grouping.py", ["--cpm", "{tmp}/cpm.npy"], 2, "NaN", _npy("cpm.npy", _cpm_with(np.nan))),
    Case(
        "grouping-cpm-inf",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy"],
        2,
        "infinite",
        _npy("cpm.npy", _cpm_with(np.inf)),
    ),
    Case(
        "grouping-cpm-negative",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy"],
        2,
        "negative",
        _npy("cpm.npy", _cpm_with(-0.1)),
    ),
    Case(
        "grouping-cpm-not-square",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy"],
        2,
        "square",
        _npy("cpm.npy", np.ones((3, 4))),
    ),
    Case(
        "grouping-cpm-empty",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy"],
        2,
        "square",
        _npy("cpm.npy", np.ones((0, 0))),
    ),
    Case(
        "grouping-cpm-not-npy",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy"],
        2,
        "not a readable .npy file",
        write_text("cpm.npy", "0.1, 0.2\n0.3, 0.4\n"),
    ),
    Case("grouping-cpm-missing", "grouping.py", ["--cpm", "{tmp}/nothing.npy"], 2, "not found"),
    Case(
        "grouping-out-txt",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy", "--out", "{tmp}/tree.txt"],
        2,
        "--out",
        both(_npy("cpm.npy", GOOD_CPM), write_text("tree.txt", "an earlier printout\n")),
    ),
    Case(
        "grouping-out-is-dir",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy", "--out", "{tmp}/data"],
        2,
        "directory",
        _npy("cpm.npy", GOOD_CPM),
    ),
    Case(
        "grouping-names-malformed",
        "grouping.py",
        ["--cpm", "{tmp}/cpm.npy", "--names", "{tmp}/names.json"],
        2,
        "names.json",
        both(_npy("cpm.npy", GOOD_CPM), write_text("names.json", '["a", "b",')),
    ),
    Case("hiernet-cpm-nan", "hiernet.py", ["--cpm", "{tmp}/cpm.npy"], 2, "NaN", _npy("cpm.npy", _cpm_with(np.nan))),
    # Data: missing, truncated, corrupted.
    Case(
        "hiernet-cifar100-missing", "hiernet.py", ["--dataset", "cifar100", "--data-dir", "{tmp}/data"], 1, "not found"
    ),
    Case(
        "latent-cifar10-truncated",
        "latent_string.py",
        ["--dataset", "cifar10", "--data-dir", "{tmp}/data"],
        1,
        "data_batch_1: truncated or corrupted",
        cifar10_truncated,
    ),
    Case(
        "merged-cifar100-truncated",
        "merged_resnet.py",
        ["--dataset", "cifar100", "--data-dir", "{tmp}/data"],
        1,
        "train: truncated or corrupted",
        cifar100_truncated,
    ),
    Case(
        "coarse-cifar100-wrong-shape",
        "coarse_outer_product.py",
        ["--dataset", "cifar100", "--data-dir", "{tmp}/data"],
        1,
        "expected N x 3072",
        cifar100_wrong_shape,
    ),
    Case(
        "latent-mnist-truncated",
        "latent_string.py",
        ["--dataset", "mnist", "--data-dir", "{tmp}/data"],
        1,
        "train-images-idx3-ubyte",
        mnist_truncated,
    ),
    Case(
        "hdl-mnist-gzipped",
        "hdl_stack.py",
        ["--dataset", "mnist", "--data-dir", "{tmp}/data"],
        1,
        "bad header",
        mnist_gzipped_in_place,
    ),
    Case(
        "hdl-folder-bad-image",
        "hdl_stack.py",
        ["--dataset", "folder", "--data-dir", "{tmp}/data"],
        1,
        "1.png",
        folder_bad_image,
    ),
    Case(
        "coarse-folder-empty-class",
        "coarse_outer_product.py",
        ["--dataset", "folder", "--data-dir", "{tmp}/data"],
        1,
        "bird",
        folder_empty_class,
    ),
    Case(
        "hdl-hierarchy-malformed",
        "hdl_stack.py",
        [*SHAPES, "--hierarchy", "{tmp}/h.json"],
        1,
        "not valid JSON",
        write_text("h.json", '{"coarse": ["a", '),
    ),
    Case(
        "merged-hierarchy-missing", "merged_resnet.py", [*SHAPES, "--hierarchy", "{tmp}/nothing.json"], 1, "not found"
    ),
]
REMEDY = {  # the data cases name what to do about it
    "latent-cifar10-truncated": "download it again",
    "merged-cifar100-truncated": "download it again",
    "coarse-cifar100-wrong-shape": "download it again",
    "latent-mnist-truncated": "download it again",
    "hdl-mnist-gzipped": "gunzip",
    "hdl-folder-bad-image": "replace the file",
    "coarse-folder-empty-class": "add images",
}


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under folder."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_case(case, tmp):
    """Prepare the case's folder, run the script, and return (result, files before)."""
    tmp.mkdir(parents=True)
    (tmp / "data").mkdir()
    (tmp / "sentinel.txt").write_text("beside the run directory\n")
    (tmp / "data" / "keep.txt").write_text("inside a pre-existing folder\n")
    if case.prepare:
        case.prepare(tmp)
    before = snapshot(tmp)
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if case.script != "grouping.py":
        argv += ["--out-dir", str(tmp / "run")]
    env = dict(os.environ, HIERCLS_NO_DOWNLOAD="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, case.script, *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return result, before


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory):
    """Run the selected cases at once (start-up bound, so a few more threads than cores)."""
    wanted = {
        item.callspec.params["case"].id
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_bad_input"
    }
    cases = [c for c in CASES if c.id in wanted]
    base = tmp_path_factory.mktemp("bad_inputs")
    with ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        futures = {c.id: pool.submit(run_case, c, base / c.id) for c in cases}
        return {key: (f.result(), base / key) for key, f in futures.items()}


def error_lines(stderr):
    """stderr without argparse's usage block (the 'usage:' line and its indented continuation)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if lines and lines[0].startswith("usage:"):
        lines = lines[1:]
        while lines and lines[0].startswith(" "):
            lines = lines[1:]
    return lines


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, outcomes):
    (result, before), tmp = outcomes[case.id]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == case.code, (result.returncode, result.stderr)
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "error:" in lines[0] and case.expect in lines[0], lines[0]
    assert REMEDY.get(case.id, "") in lines[0], lines[0]
    after = snapshot(tmp)
    for path, (data, mtime) in before.items():
        assert path in after, f"{path} was removed"
        assert after[path] == (data, mtime), f"{path} was changed"
    if case.code == 2:  # refused while parsing: nothing created yet
        assert not (tmp / "run").exists()
        assert sorted(after) == sorted(before)


def test_the_acceptance_count():
    scripts = {c.script for c in CASES}
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    assert scripts == {
        "hiernet.py",
        "grouping.py",
        "coarse_outer_product.py",
        "merged_resnet.py",
        "latent_string.py",
        "hdl_stack.py",
    }


def test_the_writers_make_files_that_load(tmp_path):
    """The damaged files above differ from loadable ones only by the damage."""
    cifar100 = tmp_path / "c100"
    train, test, hierarchy = common.load_cifar100(_cifar100(cifar100).parent)
    assert len(train) == len(test) == 200 and hierarchy.num_classes(0) == 20
    batch = pickle.loads((cifar100 / "data" / "cifar-100-python" / "train").read_bytes())
    assert np.array_equal(train.images.reshape(200, -1).numpy(), batch[b"data"])
    assert train.labels.tolist() == batch[b"fine_labels"]
    # MNIST: the reader here against torchvision's own reader of the same files.
    torchvision = pytest.importorskip("torchvision")
    mnist = tmp_path / "mnist"
    _mnist(mnist)
    train, test, _ = common.load_mnist(mnist / "data")
    reference = torchvision.datasets.MNIST(mnist / "data", train=True, download=False)
    assert torch.equal(train.images[:, 0], reference.data) and torch.equal(train.labels, reference.targets)
    assert len(test) == 20
    folder = _folder(tmp_path / "folder")
    train, test, hierarchy = common.load_folder(folder)
    assert hierarchy.class_names[-1] == ["cat", "dog"] and len(train) == len(test) == 4


# ---------------------------------------------------------------------------------------
# More flags, parsed in this process (fast): each is refused by get_args with usage + one line
# ---------------------------------------------------------------------------------------

FLAG_CASES = [
    ("hiernet", ["--n", "0"], "--n"),
    ("hiernet", ["--split", "0"], "--split"),
    ("hiernet", ["--extra-blocks", "-1"], "--extra-blocks"),
    ("hiernet", ["--depth", "0"], "--depth"),
    ("hiernet", ["--iterations", "0"], "--iterations"),
    ("hiernet", ["--backbone-iterations", "-5"], "--backbone-iterations"),
    ("hiernet", ["--weight-decay", "-1e-4"], "--weight-decay"),
    ("hiernet", ["--eval-batch-size", "0"], "--eval-batch-size"),
    ("hiernet", ["--seed", str(2**32)], "--seed"),
    ("grouping", ["--run-dir", "x", "--depth", "0"], "--depth"),
    ("grouping", ["--run-dir", "x", "--g-max", "50", "0"], "--g-max"),
    ("grouping", ["--run-dir", "x", "--p-min", "nan"], "--p-min"),
    ("grouping", ["--cpm", "no_such_cpm.npy"], "--cpm"),
    ("grouping", ["--run-dir", "x", "--out", "tree.dot"], "--out"),
    ("coarse_outer_product", ["--coarse-k", "0"], "--coarse-k"),
    ("coarse_outer_product", ["--val-per-class", "0"], "--val-per-class"),
    ("coarse_outer_product", ["--lr-factor", "0"], "--lr-factor"),
    ("coarse_outer_product", ["--hidden", "0"], "--hidden"),
    ("coarse_outer_product", ["--momentum", "1"], "--momentum"),
    ("coarse_outer_product", ["--lambda1", "nan"], "--lambda1"),
    ("coarse_outer_product", ["--recovery-l1", "-1"], "--recovery-l1"),
    ("merged_resnet", ["--depth", "0"], "--depth"),
    ("merged_resnet", ["--growth", "0"], "--growth"),
    ("merged_resnet", ["--runs", "0"], "--runs"),
    ("merged_resnet", ["--ensembles", "0"], "--ensembles"),
    ("merged_resnet", ["--val-fraction", "1"], "--val-fraction"),
    ("merged_resnet", ["--warmup-iters", "-1"], "--warmup-iters"),
    ("merged_resnet", ["--weight-decay", "inf"], "--weight-decay"),
    ("merged_resnet", ["--ttest-alpha", "nan"], "--ttest-alpha"),
    ("merged_resnet", ["--device", "cuda:x"], "--device"),
    ("latent_string", ["--bits", "0"], "--bits"),
    ("latent_string", ["--code-hidden", "0"], "--code-hidden"),
    ("latent_string", ["--mu", "0"], "--mu"),
    ("latent_string", ["--alpha", "-1"], "--alpha"),
    ("latent_string", ["--lh-epochs", "0"], "--lh-epochs"),
    ("latent_string", ["--lh-lr", "nan"], "--lh-lr"),
    ("latent_string", ["--lh-batch-size", "0"], "--lh-batch-size"),
    ("latent_string", ["--val-per-class", "-1"], "--val-per-class"),
    ("latent_string", ["--dropout", "-0.1"], "--dropout"),
    ("hdl_stack", ["--lambda-levels", "1", "-1"], "--lambda-levels"),
    ("hdl_stack", ["--lambda-fine", "nan"], "--lambda-fine"),
    ("hdl_stack", ["--lambda-center", "-1"], "--lambda-center"),
    ("hdl_stack", ["--center-alpha", "0"], "--center-alpha"),
    ("hdl_stack", ["--val-fraction", "1"], "--val-fraction"),
    ("hdl_stack", ["--eval-batch-size", "0"], "--eval-batch-size"),
    # An empty value (an unset shell variable) is refused, not read as the flag left out: `--resume ""`
    # would start a new run, `--backbone-ckpt ""` train a backbone, `grouping.py --out ""` write nothing.
    *((m, [flag, ""], flag) for m in ("hiernet", "hdl_stack") for flag in ("--out-dir", "--resume", "--data-dir")),
    ("merged_resnet", ["--hierarchy", " "], "--hierarchy"),
    ("hiernet", ["--backbone-ckpt", ""], "--backbone-ckpt"),
    ("hiernet", ["--groups", ""], "--groups"),
    ("grouping", ["--run-dir", ""], "--run-dir"),
    ("grouping", ["--run-dir", "x", "--out", ""], "--out"),
    ("latent_string", ["--base-from", ""], "--base-from"),
    ("latent_string", ["--lstm-hidden", ""], "--lstm-hidden"),
    ("latent_string", ["--bits-sweep", ""], "--bits-sweep"),
    ("latent_string", ["--hidden-sweep", ""], "--hidden-sweep"),
    ("merged_resnet", ["--coarse-level", ""], "--coarse-level"),
    ("merged_resnet", ["--tasks", ""], "--tasks"),
    ("hdl_stack", ["--stack-hidden", ""], "--stack-hidden"),
]
SCRIPTS = ["hiernet", "coarse_outer_product", "merged_resnet", "latent_string", "hdl_stack"]


@pytest.mark.parametrize("module,argv,flag", FLAG_CASES, ids=[f"{m}{''.join(a)}" for m, a, _ in FLAG_CASES])
def test_flag_refused_while_parsing(module, argv, flag, capsys):
    if module.startswith("tools/"):  # a command line of tools/, loaded from its file
        spec = importlib.util.spec_from_file_location(module, ROOT / f"{module}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    else:
        script = importlib.import_module(module)
    with pytest.raises(SystemExit) as stop:
        script.get_args(argv)
    assert stop.value.code == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "error:" in lines[0] and flag in lines[0], lines


@pytest.mark.parametrize("module", SCRIPTS)
def test_defaults_and_edge_values_still_parse(module):
    """The checks refuse only impossible values: the paper defaults and the edges of each range pass."""
    script = importlib.import_module(module)
    assert script.get_args([]).seed == 0
    args = script.get_args(["--device", "cuda:1", "--seed", str(2**32 - 1), "--epochs", "1", "--lr", "1e-6"])
    assert (args.device, args.seed, args.epochs, args.lr) == ("cuda:1", 2**32 - 1, 1, 1e-6)
    if hasattr(args, "momentum"):
        assert script.get_args(["--momentum", "0"]).momentum == 0


# ---------------------------------------------------------------------------------------
# The argparse types themselves: good values pass unchanged, bad ones are refused
# ---------------------------------------------------------------------------------------

TYPE_CASES = {
    common.positive_int: (["1", "64"], ["0", "-2", "1.5", "x"]),
    common.nonneg_int: (["0", "7"], ["-1", "nan"]),
    common.seed_int: (["0", str(2**32 - 1)], ["-1", str(2**32)]),
    common.positive_float: (["1e-4", "3"], ["0", "-1", "nan", "inf", "-inf"]),
    common.nonneg_float: (["0", "0.5"], ["-1e-9", "nan", "inf"]),
    common.fraction: (["0", "0.9", "0.999"], ["1", "-0.1", "nan", "inf"]),
    common.positive_fraction: (["0.1", "0.5"], ["0", "1", "nan"]),
    common.device_name: (["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"], ["gpu", "cuda:", "cuda:-1", "CPU", ""]),
    common.nonempty: (["runs/x", ".", "0", "a b"], ["", " ", "\t\n"]),
}


@pytest.mark.parametrize("check", list(TYPE_CASES), ids=[f.__name__ for f in TYPE_CASES])
def test_argparse_types(check):
    good, bad = TYPE_CASES[check]
    for text in good:
        value = check(text)
        assert value == text if check in (common.device_name, common.nonempty) else value == float(text)
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError):
            check(text)
