"""Sizes too large for memory, 16-bit PNGs and untested classes in image folders,
and what a newcomer meets (quick dry runs on shapes, warnings on stderr, a refused flag in one line,
error messages that point at things that exist and never at an unsafe load)."""

import ast
import importlib
import importlib.util
import pickle
import resource
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import common
from test_run_dirs import run_script  # one subprocess runner for the tests' command lines

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["hiernet", "merged_resnet", "coarse_outer_product", "latent_string", "hdl_stack"]


# --- a --train-size too large for memory ---------------------------------------------------------------


def test_a_train_size_too_large_for_memory_is_one_line(tmp_path):
    """Under an 8 GiB address-space limit, 3M 64-pixel images (37 GiB) are refused in one line
    before anything is allocated (before: a RuntimeError traceback from the allocator)."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    argv = ["hdl_stack.py", "--train-size", "3000000", "--test-size", "10", "--image-size", "64", "--device", "cpu"]
    result = run_script([*argv, "--out-dir", str(tmp_path / "run")], preexec_fn=limit)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: --train-size 3000000") and "Lower --train-size" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_load_shapes_refuses_sizes_beyond_the_available_memory(monkeypatch):
    monkeypatch.setattr(common, "available_memory", lambda: 10 << 20)  # 10 MiB
    with pytest.raises(SystemExit) as stop:
        common.load_shapes(1000, 100, 64)  # 13.5 MB of images
    assert "GiB available" in str(stop.value) and "--train-size 1000" in str(stop.value)
    train, test, _ = common.load_shapes(20, 10, 16)  # small sizes still load
    assert len(train) == 20 and len(test) == 10


# --- image folders: 16-bit PNGs, a class only in train/ --------------------------------------------------


def write_folder(root, classes_train, classes_test, image=None):
    rng = np.random.default_rng(0)
    for part, classes in (("train", classes_train), ("test", classes_test)):
        for c in classes:
            (root / part / c).mkdir(parents=True)
            for i in range(2):
                img = image if image is not None else rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / part / c / f"{i}.png")


def test_a_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1040).astype(np.uint16)  # 0 .. 65520
    write_folder(tmp_path, ["a", "b"], ["a", "b"], image=ramp)
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode == "I;16"
    train, _, _ = common.load_folder(tmp_path)
    img = train.images[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 8, 8)
    expected = np.round(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert (img[0].numpy() == expected).all() and (img[1] == img[0]).all() and (img[2] == img[0]).all()
    assert (img == 255).float().mean() < 0.05  # clipped, 98% of the pixels were white


def test_a_floating_point_image_is_refused_in_one_line(tmp_path):
    write_folder(tmp_path, ["a"], ["a"])
    Image.fromarray(np.ones((8, 8), dtype=np.float32)).save(tmp_path / "train" / "a" / "f.tif")
    common.IMAGE_SUFFIXES.add(".tif")
    try:
        with pytest.raises(SystemExit) as stop:
            common.load_folder(tmp_path)
    finally:
        common.IMAGE_SUFFIXES.discard(".tif")
    assert "floating-point image" in str(stop.value) and "\n" not in str(stop.value)


def test_a_class_folder_only_in_train_warns_on_stderr(tmp_path, capsys):
    write_folder(tmp_path, ["a", "b", "c"], ["a", "c"])
    _, _, hierarchy = common.load_folder(tmp_path)
    assert hierarchy.class_names[-1] == ["a", "b", "c"]  # still trained
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "(b)" in warnings[0] and "never tested" in warnings[0], err
    assert "warning" not in out


def test_an_unreadable_folder_cache_warns_on_stderr(tmp_path, capsys):
    write_folder(tmp_path, ["a"], ["a"])
    common.load_folder(tmp_path)
    (cache,) = tmp_path.glob(".cache-*.pt")
    cache.write_bytes(b"not a cache")
    common.load_folder(tmp_path)
    out, err = capsys.readouterr()
    assert "warning: the image cache" in err and "warning" not in out


# --- --dry-run: quick, on shapes, for every script ---------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_dry_run_defaults_to_small_shapes(script, capsys):
    args = importlib.import_module(script).get_args(["--dry-run"])
    assert args.dataset == "shapes" and args.image_size == 32
    assert args.train_size <= 2048 and args.test_size <= (720 if script == "hiernet" else 256)
    assert "dry run: --dataset shapes" in capsys.readouterr().out


def test_a_dry_run_keeps_the_flags_given_and_real_runs_keep_the_papers_defaults():
    import hiernet
    import merged_resnet

    args = hiernet.get_args(["--dry-run", "--train-size", "3000", "--image-size", "16"])
    assert (args.train_size, args.image_size, args.test_size) == (3000, 16, 720)
    assert hiernet.get_args([]).dataset == "cifar100"
    real = merged_resnet.get_args([])
    assert (real.depth, real.runs, real.train_size, real.image_size) == (164, 5, 20000, None)
    dry = merged_resnet.get_args(["--dry-run"])
    assert (dry.depth, dry.runs) == (11, 2)
    assert merged_resnet.get_args(["--dry-run", "--backbone", "densenet"]).depth == 10
    assert merged_resnet.get_args(["--dry-run", "--depth", "29"]).depth == 29
    # A dry run on real data keeps the data's own sizes (no --image-size for CIFAR).
    cifar = hiernet.get_args(["--dry-run", "--dataset", "cifar100"])
    assert cifar.image_size is None and cifar.test_halves == "authors"


def test_hiernet_dry_run_runs_offline_on_shapes(tmp_path):
    """`python hiernet.py --dry-run --device cpu` (before: CIFAR-100, a download or an error offline)."""
    result = run_script(["hiernet.py", "--dry-run", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[hiernet] shapes:" in result.stdout


# --- warnings on stderr, a refused flag in one line ----------------------------------------------------------


def warning_prints_to_stdout(path):
    """print(...) calls whose message starts with (or, after a [tag], is) a warning, without file=sys.stderr."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print" and node.args):
            continue
        text = "".join(
            part.value
            for arg in node.args[:1]
            for part in ([arg] if isinstance(arg, ast.Constant) else getattr(arg, "values", []))
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
        )
        to_stderr = any(k.arg == "file" and ast.unparse(k.value) == "sys.stderr" for k in node.keywords)
        if "warning:" in text.lower()[:40] and not to_stderr:
            found.append(f"{path.name}:{node.lineno}")
    return found


def test_warnings_go_to_stderr():
    paths = [ROOT / f"{name}.py" for name in [*SCRIPTS, "grouping", "common"]]
    assert [hit for path in paths for hit in warning_prints_to_stdout(path)] == []


@pytest.mark.parametrize("script", [*SCRIPTS, "grouping"])
def test_a_refused_flag_is_one_line_without_the_usage(script, capsys):
    argv = ["--cpm", "x.npy", "--p-min", "-1"] if script == "grouping" else ["--epochs", "0"]
    module = importlib.import_module(script)
    with pytest.raises(SystemExit) as stop:
        module.get_args(argv)
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # prog is sys.argv[0]'s name (pytest's here; the script's in a subprocess, below)
    assert len(lines) == 1 and ": error: argument " in lines[0] and lines[0].endswith(" -h lists the flags)"), lines


def test_a_refused_flag_in_a_subprocess(tmp_path):
    result = run_script(["coarse_outer_product.py", "--coarse-k", "1"])
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "coarse_outer_product.py: error: --coarse-k must be at least 2 (coarse_outer_product.py -h lists the flags)"
    ]


# --- error messages ----------------------------------------------------------------------------------------


def test_the_authors_halves_error_names_no_missing_readme_or_tool():
    import hiernet

    args = SimpleNamespace(test_halves="authors", seed=0)
    with pytest.raises(SystemExit) as stop:
        hiernet.test_halves(args, np.arange(10000) % 100)  # CIFAR-100 sizes, another order
    message = str(stop.value)
    assert "README" not in message and "tool" not in message and "--test-halves seeded" in message


class Planted:
    def __reduce__(self):
        return (print, ("planted",))


def test_a_planted_checkpoint_is_explained_without_torchs_unsafe_advice(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}, "x": Planted()}, path)
    with pytest.raises(SystemExit) as stop:
        common.load_checkpoint(path)
    message = str(stop.value)
    assert "weights_only" not in message and "can still be loaded" not in message, message
    assert "could run code" in message and "train again" in message and "\n" not in message
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:40])
    with pytest.raises(SystemExit) as stop:
        common.load_checkpoint(tmp_path / "cut.pt")
    assert "truncated or damaged" in str(stop.value) and "weights_only" not in str(stop.value)


def test_a_planted_pickle_is_refused_by_the_weights_only_load(tmp_path):
    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps(Planted()))
    with pytest.raises(SystemExit) as stop:
        common.load_checkpoint(path)
    assert "weights_only" not in str(stop.value)


# --- the README -------------------------------------------------------------------------------------------


def test_the_readme_shows_a_cpu_install_and_every_scripts_offline_dry_run():
    readme = (ROOT / "README.md").read_text()
    cpu = '"torchvision>=0.26,<=0.29.1" --index-url https://download.pytorch.org/whl/cpu'
    assert f'pip install "torch>=2.11,<=2.14.1" {cpu}' in readme
    assert "about 80 s" not in readme and "Every other script runs\noffline the same way" not in readme
    for script in SCRIPTS:
        assert f"python {script}.py --dry-run --device cpu" in readme, script
