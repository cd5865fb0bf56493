"""Shared toolbox for the hierarchical-classification scripts: what several of them use.

Plain functions and nn.Modules, in sections read top to bottom:

1. data: CIFAR-100 / CIFAR-10 pickles, MNIST, image folders, the synthetic `shapes`
   dataset, class hierarchies, load_data, class-balanced splits
2. GpuLoader: the whole split as uint8 on the device, augmented there in batch
3. backbones shared by several scripts: the stem / stages / head interface, VGG with batch
   norm, weight init. A backbone that one script uses lives in that script: the CIFAR ResNet
   (6n+2, ELU variant) in hiernet.py, pre-activation ResNet-164 and DenseNet-BC in
   merged_resnet.py, ResNet-18 / PreAct ResNet-18 in hdl_stack.py, the MNIST LeNet in
   latent_string.py
4. training: optimizers, schedules, one train step (bf16 autocast, channels_last, optional
   CUDA graph), `fit` with checkpoints (every epoch, or
   every --checkpoint-every) and resume
5. evaluation and metrics: `predict`, accuracies, hierarchical measures, images/s
6. runs: the shared flags and what a resume may change, run directories (setup, locks, the
   files a run wrote), the data's fingerprint, atomic files, checkpoints and RNG states
7. several processes (torchrun): the ddp and sweep modes

Every script imports this file; a script's method, and what only that script uses, live in the script.
"""

import argparse
import atexit
import datetime
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def fail(message):
    """Stop with one clear line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


def _cannot(what, error):
    """fail() for a file-system error: `cannot <what>: <the system's reason>`."""
    fail(f"cannot {what}: {error.strerror or error}")


# =============================================================================================
# 1. Data: the datasets (CIFAR-100 / CIFAR-10 pickles, MNIST, image folders, the synthetic shapes),
#    class hierarchies, load_data, class-balanced splits
# =============================================================================================


DATASETS = ("shapes", "cifar100", "cifar10", "mnist", "folder")


# ---- Class hierarchies, and the containers of a loaded dataset


@dataclass
class Hierarchy:
    """Class levels, coarsest first; the last level is the fine (leaf) classes.

    parents[l][f] is the level-l class of fine class f, so parents[-1] is the identity."""

    level_names: list
    class_names: list  # one list of names per level
    parents: list  # one int64 np.ndarray of length n_fine per level

    @property
    def n_levels(self):
        return len(self.level_names)

    def num_classes(self, level=-1):
        return len(self.class_names[level])

    def labels(self, level, fine_labels):
        """Map fine labels (tensor or array) to the labels of `level` (index or name)."""
        if isinstance(level, str):
            level = self.level_names.index(level)
        parent = self.parents[level]
        if isinstance(fine_labels, torch.Tensor):
            return torch.as_tensor(parent, device=fine_labels.device)[fine_labels]
        return parent[np.asarray(fine_labels)]

    def children(self, level, index):
        """Fine classes under class `index` of `level`."""
        return np.flatnonzero(self.parents[level] == index)

    def to_json(self):
        return {
            "level_names": self.level_names,
            "class_names": self.class_names,
            "parents": [p.tolist() for p in self.parents],
        }


def hierarchy_from_labels(fine_labels, coarse_labels, level_names, class_names):
    """Build a hierarchy from per-image label arrays, coarsest level first, fine last.

    Each fine class must fall under exactly one class of every coarser level."""
    fine_labels = np.asarray(fine_labels)
    n_fine = len(class_names[-1])
    parents = []
    for name, coarse in zip(level_names[:-1], coarse_labels):
        coarse = np.asarray(coarse)
        parent = np.full(n_fine, -1, dtype=np.int64)
        for f in range(n_fine):
            values = np.unique(coarse[fine_labels == f])
            if len(values) > 1:
                fail(
                    f"hierarchy: fine class {class_names[-1][f]!r} falls under several '{name}' classes {values.tolist()}"
                )
            if len(values) == 1:
                parent[f] = values[0]
        if (parent < 0).any():
            fail(f"hierarchy: fine classes without images, parent unknown: {np.flatnonzero(parent < 0).tolist()}")
        parents.append(parent)
    parents.append(np.arange(n_fine, dtype=np.int64))
    return Hierarchy(list(level_names), [list(n) for n in class_names], parents)


MAX_HIERARCHY_DEPTH = 100  # levels of a hierarchy JSON; deeper nesting is refused in one line


def hierarchy_from_json(obj, fine_names, source="hierarchy"):
    """Parse {coarse: [fine, ...]} or nested {top: {mid: [fine, ...]}} into a Hierarchy.

    Every fine class must appear exactly once, all leaves at the same depth."""
    fine_index = {n: i for i, n in enumerate(fine_names)}
    paths = {}  # fine name -> list of ancestor names, top first

    def walk(node, trail):
        if len(trail) > MAX_HIERARCHY_DEPTH:
            fail(f"{source}: nested deeper than {MAX_HIERARCHY_DEPTH} levels")
        if isinstance(node, dict):
            if not node:
                fail(f"{source}: empty group under {'/'.join(trail) or 'the root'}")
            for key, child in node.items():
                walk(child, trail + [str(key)])
        elif isinstance(node, list):
            for leaf in node:
                if not isinstance(leaf, str):
                    fail(f"{source}: a leaf under {'/'.join(trail)} is not a class name: {leaf!r}")
                if leaf not in fine_index:
                    fail(f"{source}: unknown class {leaf!r} under {'/'.join(trail)}; known: {', '.join(fine_names)}")
                if leaf in paths:
                    fail(f"{source}: class {leaf!r} is listed twice ({'/'.join(paths[leaf])} and {'/'.join(trail)})")
                paths[leaf] = trail
        else:
            fail(f"{source}: expected an object or a list under {'/'.join(trail) or 'the root'}, got {node!r}")

    if not isinstance(obj, dict):
        fail(f"{source}: the top level must be an object {{coarse name: [fine names]}}")
    walk(obj, [])
    missing = [n for n in fine_names if n not in paths]
    if missing:
        fail(f"{source}: class {missing[0]!r} is missing from the hierarchy ({len(missing)} missing in all)")
    depths = {len(p) for p in paths.values()}
    if len(depths) != 1:
        fail(f"{source}: every class must sit at the same depth; found depths {sorted(depths)}")
    depth = depths.pop()
    class_names, parents = [], []
    for level in range(depth):
        names = []  # a coarse class is identified by its full path, named by its last part
        keys = {}
        parent = np.zeros(len(fine_names), dtype=np.int64)
        for fine in fine_names:
            key = tuple(paths[fine][: level + 1])
            if key not in keys:
                keys[key] = len(names)
                names.append(key[-1])
            parent[fine_index[fine]] = keys[key]
        class_names.append(names)
        parents.append(parent)
    class_names.append(list(fine_names))
    parents.append(np.arange(len(fine_names), dtype=np.int64))
    level_names = [f"level{l + 1}" for l in range(depth)] + ["fine"]
    if depth == 1:
        level_names = ["coarse", "fine"]
    return Hierarchy(level_names, class_names, parents)


def load_hierarchy_file(path, fine_names):
    path = Path(path)
    if not path.is_file():
        fail(f"--hierarchy {path}: file not found")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"--hierarchy {path}: not valid JSON ({e})")
    except RecursionError:
        fail(f"--hierarchy {path}: nested too deep to read (at most {MAX_HIERARCHY_DEPTH} levels)")
    return hierarchy_from_json(obj, fine_names, source=str(path))


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W, on the CPU
    labels: torch.Tensor  # int64 fine labels, N
    extra: dict = field(default_factory=dict)  # other per-image labels (e.g. shapes' fill colour)

    def __len__(self):
        return len(self.labels)

    def subset(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx], {k: v[idx] for k, v in self.extra.items()})


@dataclass
class Data:
    name: str
    train: Split
    test: Split
    hierarchy: Hierarchy
    mean: tuple  # per channel, in [0, 1] units
    std: tuple

    @property
    def num_classes(self):
        return self.hierarchy.num_classes(-1)

    @property
    def class_names(self):
        return self.hierarchy.class_names[-1]


# ---- The on-disk formats: CIFAR pickles, MNIST IDX files, image folders


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR file holds (dicts, lists, bytes, numbers and numpy arrays): any
    other global, the way a planted pickle runs code, is refused before it is looked up."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes in a protocol-2 pickle written by Python 3
        *(
            (module, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        ),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR file never holds; not loaded")
        return super().find_class(module, name)


def _unpickle(path, remedy):
    """A CIFAR pickle as a dict with str keys; an unreadable or planted file stops with one line.

    The CIFAR format is pickle: only numpy arrays and plain values are unpickled (_CifarUnpickler)."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in many ways (EOFError, UnpicklingError, ...)
        fail(f"{path}: truncated or corrupted ({type(e).__name__}: {e}); {remedy}")
    if not isinstance(obj, dict):
        fail(f"{path}: not a CIFAR pickle (holds a {type(obj).__name__}, not a dict); {remedy}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _cifar_batch(path, label_counts, remedy):
    """One CIFAR pickle: (uint8 N x 3 x 32 x 32 images, [int64 labels per key of label_counts]).

    label_counts maps a label key to its number of classes; shapes and label ranges are checked."""
    d = _unpickle(path, remedy)
    for key in ("data", *label_counts):
        if key not in d:
            fail(f"{path}: no {key!r} entry; not a CIFAR batch file; {remedy}")
    try:
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = [np.asarray(d[key], dtype=np.int64).reshape(-1) for key in label_counts]
    except (TypeError, ValueError) as e:
        fail(f"{path}: unreadable ({type(e).__name__}: {e}); {remedy}")
    for key, y in zip(label_counts, labels):
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(y):
            fail(f"{path}: image array of shape {data.shape} for {len(y)} {key}, expected N x 3072; {remedy}")
        if len(y) and not (y.min() >= 0 and y.max() < label_counts[key]):
            fail(f"{path}: {key} outside 0..{label_counts[key] - 1}; {remedy}")
    return data.reshape(-1, 3, 32, 32), labels


def _names(values):
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _try_download(kind, root):
    """Fetch through torchvision when online; on failure say what to do, in one line."""
    import torchvision

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)
    try:
        {
            "cifar100": torchvision.datasets.CIFAR100,
            "cifar10": torchvision.datasets.CIFAR10,
            "mnist": torchvision.datasets.MNIST,
        }[kind](root, train=True, download=True)
        return True
    except Exception:
        return False
    finally:
        socket.setdefaulttimeout(old)


def _need(path, kind, root, what):
    if path.exists():
        return
    if os.environ.get("HIERCLS_NO_DOWNLOAD") != "1" and _try_download(kind, root) and path.exists():
        return
    fail(
        f"{what} not found at {path}; download failed (offline?). Put torchvision's {what} files under "
        f"--data-dir {root} (or run once with internet), or use --dataset shapes"
    )


def load_cifar100(data_dir):
    """CIFAR-100 from torchvision's pickles, with fine and coarse (superclass) labels."""
    root = Path(data_dir)
    base = root / "cifar-100-python"
    _need(base / "meta", "cifar100", root, "cifar-100-python")
    for part in ("train", "test"):
        if not (base / part).exists():
            fail(f"cifar-100-python/{part} not found under {root}; the download is incomplete, fetch it again")
    remedy = f"delete {base} and download it again (or unpack cifar-100-python.tar.gz again)"
    meta = _unpickle(base / "meta", remedy)
    if "fine_label_names" not in meta or "coarse_label_names" not in meta:
        fail(f"{base / 'meta'}: no class names; not CIFAR-100's meta file; {remedy}")
    fine_names, coarse_names = _names(meta["fine_label_names"]), _names(meta["coarse_label_names"])
    splits, coarse = {}, {}
    for part in ("train", "test"):
        label_counts = {"fine_labels": len(fine_names), "coarse_labels": len(coarse_names)}
        images, (fine, coarse[part]) = _cifar_batch(base / part, label_counts, remedy)
        splits[part] = Split(torch.from_numpy(images.copy()), torch.from_numpy(fine))
    hierarchy = hierarchy_from_labels(
        splits["train"].labels.numpy(), [coarse["train"]], ["coarse", "fine"], [coarse_names, fine_names]
    )
    if not (hierarchy.parents[0][splits["test"].labels.numpy()] == coarse["test"]).all():
        fail("cifar-100-python: the test set's coarse labels disagree with the training set's")
    return splits["train"], splits["test"], hierarchy


CIFAR10_HIERARCHY = {
    "vehicles": ["airplane", "automobile", "ship", "truck"],
    "animals": ["bird", "cat", "deer", "dog", "frog", "horse"],
}


def load_cifar10(data_dir):
    """CIFAR-10 from the pickle layout, read directly (no md5 check, so re-encoded copies load)."""
    root = Path(data_dir)
    base = root / "cifar-10-batches-py"
    _need(base / "batches.meta", "cifar10", root, "cifar-10-batches-py")
    remedy = f"delete {base} and download it again (or unpack cifar-10-python.tar.gz again)"
    meta = _unpickle(base / "batches.meta", remedy)
    if "label_names" not in meta:
        fail(f"{base / 'batches.meta'}: no label_names; not CIFAR-10's meta file; {remedy}")
    names = _names(meta["label_names"])
    splits = {}
    for part, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels = [], []
        for name in files:
            if not (base / name).exists():
                fail(f"{base / name} not found; the cifar-10-batches-py folder is incomplete: {remedy}")
            batch_images, (batch_labels,) = _cifar_batch(base / name, {"labels": len(names)}, remedy)
            images.append(batch_images)
            labels.append(batch_labels)
        splits[part] = Split(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))
    hierarchy = hierarchy_from_json(CIFAR10_HIERARCHY, names, source="built-in CIFAR-10 hierarchy")
    return splits["train"], splits["test"], hierarchy


def _read_idx(path, ndim, remedy):
    """One MNIST IDX file (magic 0 0 8 ndim, big-endian uint32 sizes, uint8 data) as an array."""
    if not path.is_file():
        fail(f"{path} not found; {remedy}")
    raw = path.read_bytes()
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 8, ndim]):
        fail(f"{path}: not an MNIST ubyte file of {ndim} dimension(s) (bad header); {remedy}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != math.prod(dims):
        fail(f"{path}: {len(raw) - header} bytes of data for sizes {dims}: truncated or corrupted; {remedy}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(data_dir):
    """MNIST from torchvision's on-disk layout (MNIST/raw/*-ubyte), read and checked here."""
    root = Path(data_dir)
    raw = root / "MNIST" / "raw"
    _need(raw / "t10k-labels-idx1-ubyte", "mnist", root, "MNIST")
    remedy = f"delete {root / 'MNIST'} and download it again (or gunzip the *-ubyte.gz files again)"
    splits = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(raw / f"{prefix}-images-idx3-ubyte", 3, remedy)
        labels = _read_idx(raw / f"{prefix}-labels-idx1-ubyte", 1, remedy)
        if len(images) != len(labels) or images.shape[1:] != (28, 28):
            fail(f"{raw}: {prefix} images {images.shape} do not match {len(labels)} labels of 28 x 28 digits; {remedy}")
        if len(labels) and labels.max() > 9:
            fail(f"{raw / f'{prefix}-labels-idx1-ubyte'}: a label above 9; {remedy}")
        splits[part] = Split(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    names = [str(i) for i in range(10)]
    return splits["train"], splits["test"], Hierarchy(["fine"], [names], [np.arange(10)])


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _folder_files(root):
    """[(class, path)] of train and test, sorted; the class names come from train/."""
    files = {}
    for part in ("train", "test"):
        part_dir = root / part
        if not part_dir.is_dir():
            fail(f"image folder {part_dir} not found; expected {root}/train/<class>/* and {root}/test/<class>/*")
        images = {
            c.name: [p for p in sorted(c.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            for c in sorted(part_dir.iterdir())
            if c.is_dir()
        }
        if not images:
            fail(f"image folder {part_dir} holds no class folders")
        # An empty class folder is an error, not skipped: dropping it would renumber the classes
        # and silently change the class list that hierarchies, checkpoints and results refer to.
        empty = [c for c, paths in images.items() if not paths]
        if empty:
            fail(
                f"image folder {part_dir}: class folder(s) without images ({', '.join(empty[:5])}"
                f"{', ...' if len(empty) > 5 else ''}); add images ({', '.join(sorted(IMAGE_SUFFIXES))}) or remove them"
            )
        files[part] = [(c, p) for c, paths in images.items() for p in paths]
    return files


FOLDER_DECODER = 2  # 2: 16-bit grayscale scaled to 8 bits (1: clipped at 255 by PIL's convert)


def _rgb8(im, path):
    """A PIL image as uint8 H x W x 3. 16-bit grayscale (PNG's I;16 modes, or mode I from a PNG,
    which is 16-bit there) is scaled to 0..255 (v * 255 / 65535, rounded); PIL's convert("RGB")
    would clip it at 255 and turn most pixels white. Other 32-bit integer or float images are
    refused (their range is unknown)."""
    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        a = np.asarray(im, dtype=np.float64)
        gray = np.clip(np.round(a * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if im.mode in ("I", "F"):
        fail(
            f"{path}: a {'32-bit integer' if im.mode == 'I' else 'floating-point'} image ({im.format} mode {im.mode}), "
            "whose range is unknown; save it as an 8- or 16-bit PNG or as JPEG"
        )
    return np.array(im.convert("RGB"))


def load_folder(data_dir, image_size=None):
    """An ImageFolder-style tree, decoded once and cached as uint8 beside it.

    The cache key covers every file's path, size and mtime and the image size, so a changed
    folder is decoded again."""
    import torchvision
    from PIL import Image

    root = Path(data_dir)
    files = _folder_files(root)
    class_names = sorted({c for c, _ in files["train"]})
    unknown = sorted({c for c, _ in files["test"]} - set(class_names))
    if unknown:
        fail(f"{root}/test has classes that {root}/train lacks: {', '.join(unknown)}")
    # A class with no test images still trains (a class list is the train folders'), but no test
    # number says anything about it: one warning line.
    untested = sorted(set(class_names) - {c for c, _ in files["test"]})
    if untested:
        print(
            f"warning: {root}/test has no folder for {len(untested)} class(es) of train/ "
            f"({', '.join(untested[:5])}{', ...' if len(untested) > 5 else ''}); they are trained but never tested",
            file=sys.stderr,
            flush=True,
        )
    # FOLDER_DECODER in the key: a cache decoded by an older rule (16-bit images clipped) is rebuilt.
    key = hashlib.sha1(f"{FOLDER_DECODER}|{image_size!r}".encode())
    for part in ("train", "test"):
        for c, p in files[part]:
            st = p.stat()
            key.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = root / f".cache-{image_size or 'native'}-{key.hexdigest()[:16]}.pt"
    obj = _read_folder_cache(cache, len(files["train"]), len(files["test"]))
    if obj is None:
        index = {c: i for i, c in enumerate(class_names)}
        obj = {"class_names": class_names}
        for part in ("train", "test"):
            images = []
            for c, p in files[part]:
                try:
                    with Image.open(p) as im:
                        img = torch.from_numpy(_rgb8(im, p)).permute(2, 0, 1).contiguous()
                except Exception as e:
                    fail(f"cannot decode image {p} ({e}); replace the file (re-copy or re-unpack it) or remove it")
                if image_size and tuple(img.shape[1:]) != (image_size, image_size):
                    img = torchvision.transforms.functional.resize(img, [image_size, image_size], antialias=True)
                images.append(img)
            shapes = {tuple(i.shape) for i in images}
            if len(shapes) > 1:
                fail(f"{root}/{part}: images differ in size {sorted(shapes)[:3]}...; pass --image-size to resize them")
            obj[part] = (torch.stack(images), torch.tensor([index[c] for c, _ in files[part]]))
        _write_folder_cache(cache, obj, f".cache-{image_size or 'native'}-")
    train, test = (Split(*obj[part]) for part in ("train", "test"))
    return train, test, Hierarchy(["fine"], [obj["class_names"]], [np.arange(len(obj["class_names"]))])


def _read_folder_cache(cache, n_train, n_test):
    """The decoded folder, or None when there is no cache or it is unreadable (then it is rebuilt).

    Read with weights_only=True: a planted file cannot run code, it only fails to load."""
    if not cache.exists():
        return None
    try:
        obj = torch.load(cache, map_location="cpu", weights_only=True)
        names = obj["class_names"]
        for part, n in (("train", n_train), ("test", n_test)):
            images, labels = obj[part]
            if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != n or labels.shape != (n,):
                raise ValueError(f"its {part} split does not match the folder")
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(names):
                raise ValueError(f"its {part} labels are out of range")
        return obj
    except Exception as e:
        reason = (
            "it holds more than tensors and plain values; not loaded"
            if _refused_as_unsafe(e)
            else _first_sentence(e, 120)
        )
        print(
            f"warning: the image cache {cache} is unreadable ({reason}); decoding the images again",
            file=sys.stderr,
            flush=True,
        )
        return None


def _write_folder_cache(cache, obj, prefix):
    """Replace the folder's caches by this one, atomically; a read-only or full folder only warns."""
    for old in cache.parent.glob(prefix + "*"):
        try:
            if old.suffix == ".pt" or time.time() - old.stat().st_mtime > 3600:  # or a killed write's temp
                old.unlink()
        except OSError:
            pass
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        _atomic_write(cache, buffer.getvalue())
    except OSError as e:
        print(
            f"warning: cannot write the image cache {cache} ({e.strerror or e}); decoding without a cache",
            file=sys.stderr,
            flush=True,
        )


# ---- The synthetic shapes dataset (generated, nothing on disk)

# The shapes dataset of the HDL paper (section 3): triangle or square, one of six fill colours,
# one of six outline colours; 2 x 6 x 6 = 72 leaf classes.
SHAPE_NAMES = ["triangle", "square"]
FILL_COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 220, 40),
    "magenta": (210, 40, 200),
    "cyan": (40, 210, 220),
}
OUTLINE_COLOURS = {
    "white": (250, 250, 250),
    "orange": (255, 140, 0),
    "purple": (110, 30, 150),
    "grey": (128, 128, 128),
    "brown": (120, 70, 20),
    "pink": (255, 170, 200),
}


def make_shapes(n, image_size=64, seed=0, chunk=512):
    """Render n shapes images; returns (uint8 N x 3 x S x S, labels dict).

    Random centre, size (40 to 90% of the image across) and rotation; the outline
    width scales with the size. Pixel-exact from the seed, in seconds for 20k images."""
    g = torch.Generator().manual_seed(seed)
    S = image_size
    shape = torch.randint(0, 2, (n,), generator=g)
    fill = torch.randint(0, 6, (n,), generator=g)
    outline = torch.randint(0, 6, (n,), generator=g)
    radius = (0.4 + 0.5 * torch.rand(n, generator=g)) * S / 2  # circumradius in pixels
    margin = radius + 1
    cx = margin + torch.rand(n, generator=g) * (S - 2 * margin)
    cy = margin + torch.rand(n, generator=g) * (S - 2 * margin)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    width = (radius * 0.15).clamp(min=1.5)
    fill_rgb = torch.tensor(list(FILL_COLOURS.values()), dtype=torch.float32)
    outline_rgb = torch.tensor(list(OUTLINE_COLOURS.values()), dtype=torch.float32)
    ys, xs = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing="ij")
    images = torch.empty(n, 3, S, S, dtype=torch.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        m = sl.stop - sl.start
        # Vertices of a regular polygon (3 or 4 corners; a triangle repeats its last corner).
        k = torch.arange(4).float()
        corners = torch.where(shape[sl, None] == 0, torch.minimum(k, torch.tensor(2.0)) / 3, k / 4)
        theta = angle[sl, None] + 2 * math.pi * corners
        vx = cx[sl, None] + radius[sl, None] * torch.cos(theta)
        vy = cy[sl, None] + radius[sl, None] * torch.sin(theta)
        # Signed distance of each pixel to each edge line (positive inside); degenerate
        # edges of triangles are skipped.
        ex, ey = vx.roll(-1, 1) - vx, vy.roll(-1, 1) - vy
        length = torch.sqrt(ex**2 + ey**2)
        valid = length > 1e-6
        nx, ny = -ey / length.clamp(min=1e-6), ex / length.clamp(min=1e-6)
        px = xs[None, None] - vx[:, :, None, None]
        py = ys[None, None] - vy[:, :, None, None]
        dist = px * nx[:, :, None, None] + py * ny[:, :, None, None]  # m x 4 x S x S
        # Corners advance counter-clockwise, so the left normal points inside; the sign of the
        # first turn says which way that is in image coordinates.
        turn = torch.sign(ex[:, 0] * ey[:, 1] - ey[:, 0] * ex[:, 1])
        dist = dist * turn[:, None, None, None]
        dist = torch.where(valid[:, :, None, None], dist, torch.full_like(dist, float("inf")))
        inside = dist.min(1).values  # m x S x S
        is_fill = inside >= width[sl, None, None]
        is_line = (inside >= 0) & ~is_fill
        img = torch.randint(0, 25, (m, 3, S, S), generator=g).float()  # a dark, noisy background
        img = torch.where(is_fill[:, None], fill_rgb[fill[sl]][:, :, None, None], img)
        img = torch.where(is_line[:, None], outline_rgb[outline[sl]][:, :, None, None], img)
        images[sl] = img.round().clamp(0, 255).to(torch.uint8)
    labels = {
        "shape": shape,
        "fill": fill,
        "outline": outline,
        "shape_fill": shape * 6 + fill,
        "fine": shape * 36 + fill * 6 + outline,
    }
    return images, labels


def shapes_hierarchy():
    fills, outlines = list(FILL_COLOURS), list(OUTLINE_COLOURS)
    names = [
        SHAPE_NAMES,
        [f"{s} {f}" for s in SHAPE_NAMES for f in fills],
        [f"{s} {f} {o}" for s in SHAPE_NAMES for f in fills for o in outlines],
    ]
    fine = np.arange(72)
    return Hierarchy(["shape", "shape_fill", "fine"], names, [fine // 36, fine // 6, fine])


def available_memory():
    """Bytes this process may still allocate: MemAvailable of /proc/meminfo (physical memory where
    there is none), lowered to the address-space limit (ulimit -v) when one is set."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            free = min(free, limit)
    except (ImportError, OSError, ValueError):
        pass
    return free


def _gib(n):
    return f"{n / 2**30:.1f} GiB"


def load_shapes(n_train=20000, n_test=6000, image_size=64, seed=0):
    """The synthetic hierarchical dataset; train and test drawn from disjoint seeds.

    Sizes that cannot fit are refused in one line before anything is allocated: the uint8 images
    (3 x S x S bytes each) must fit in half the memory available, since the scripts copy splits
    (a validation hold-out, a subset) beside them."""
    need = (n_train + n_test) * (3 * image_size * image_size + 64)
    free = available_memory()
    if free is not None and 2 * need > free:
        fail(
            f"--train-size {n_train} --test-size {n_test} --image-size {image_size}: the shapes images take "
            f"{_gib(need)}, and the run needs about twice that; this machine has {_gib(free)} available. "
            "Lower --train-size (or --test-size, --image-size)"
        )
    splits = []
    for n, offset in ((n_train, 0), (n_test, 1)):
        try:
            images, labels = make_shapes(n, image_size, seed=seed * 2 + offset + 12345)
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and "allocate" not in str(e):
                raise
            fail(
                f"out of memory generating {n} shapes images of {image_size} pixels ({_first_sentence(e, 100)}); "
                "lower --train-size (or --test-size, --image-size)"
            )
        extra = {k: v for k, v in labels.items() if k != "fine"}
        splits.append(Split(images, labels["fine"], extra))
    return splits[0], splits[1], shapes_hierarchy()


# ---- load_data (--dataset, --hierarchy) and class-balanced splits


def channel_stats(images, max_images=10000):
    x = images[:max_images].float() / 255
    return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).clamp(min=1e-3).tolist())


def load_data(args):
    """Load --dataset under --data-dir; --hierarchy overrides the built-in class levels."""
    name = args.dataset
    if name == "shapes":
        size = args.image_size or 64
        train, test, hierarchy = load_shapes(args.train_size, args.test_size, size, seed=args.seed)
    elif name == "cifar100":
        train, test, hierarchy = load_cifar100(args.data_dir)
    elif name == "cifar10":
        train, test, hierarchy = load_cifar10(args.data_dir)
    elif name == "mnist":
        train, test, hierarchy = load_mnist(args.data_dir)
    elif name == "folder":
        train, test, hierarchy = load_folder(args.data_dir, args.image_size)
    else:
        fail(f"unknown dataset {name!r}")
    if name not in ("shapes", "folder") and args.image_size and args.image_size != train.images.shape[-1]:
        fail(
            f"--image-size {args.image_size}: {name} images are {train.images.shape[-1]} pixels; resizing is only for shapes and folder"
        )
    if getattr(args, "hierarchy", None):
        hierarchy = load_hierarchy_file(args.hierarchy, hierarchy.class_names[-1])
    mean, std = channel_stats(train.images)
    data = Data(name, train, test, hierarchy, mean, std)
    _check_run_data(args, data)
    return data


def stratified_split(labels, n_per_class, seed):
    """Pick n_per_class images of every class (a seeded, class-balanced draw).

    Returns (picked, rest) as sorted int64 index arrays; used for validation hold-outs
    (e.g. 100 of CIFAR-100's 500 training images per class, or half of each test class)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if n_per_class > len(idx):
            fail(f"stratified split: class {c} has {len(idx)} images, fewer than the {n_per_class} asked for")
        picked.append(rng.permutation(idx)[:n_per_class])
    picked = np.sort(np.concatenate(picked))
    rest = np.setdiff1d(np.arange(len(labels)), picked)
    return picked, rest


# =============================================================================================
# 2. The GPU-resident loader: the whole split as uint8 on the device, augmented there in batch
# =============================================================================================


class GpuLoader:
    """Batches from a split held whole on the device as uint8.

    Augmentation happens on the device, in batch: a random translation by up to `crop_pad`
    pixels (pad, then crop; the border filled with `fill`, a 0..255 grey level), a random
    horizontal flip, then normalisation. A fresh permutation per epoch comes from the loader's
    own generator, so nothing in an epoch waits for the host. `labels` is a tensor or a tuple of
    tensors; batches are (images, labels) in the same structure.

    Sharded (shard=(rank, world); by default a training loader under --distributed ddp):
    `batch_size` is the batch of one process (per GPU) and the global batch is world x
    batch_size. Every rank draws the same seeded permutation and the same augmentation numbers
    for the whole global batch and keeps its contiguous part of each, so W ranks at batch B see
    exactly the batches and augmentations of one process at batch W x B, every rank the same
    number of batches (len(loader) counts global batches)."""

    def __init__(
        self,
        images,
        labels,
        batch_size,
        *,
        device,
        mean,
        std,
        train=False,
        crop_pad=0,
        fill=0,
        flip=False,
        seed=0,
        drop_last=None,
        max_batches=None,
        channels_last=None,
        shard=None,
    ):
        self.device = torch.device(device)
        if shard is None:
            shard = (rank(), world_size()) if train and ddp_active() else (0, 1)
        self.rank, self.world = shard
        try:
            self.images = images.to(self.device)
        except torch.OutOfMemoryError:
            fail(
                f"the split's {len(images)} images ({_gib(images.numel() * images.element_size())}) do not fit in "
                f"the memory of {self.device}; lower --train-size / --test-size or --image-size"
            )
        self.single = isinstance(labels, torch.Tensor)
        self.labels = tuple(l.to(self.device) for l in ((labels,) if self.single else labels))
        self.batch_size, self.train = batch_size, train
        self.crop_pad, self.fill, self.flip = crop_pad, fill, flip
        self.drop_last = train if drop_last is None else drop_last
        # channels_last helps the GPU's convolutions and slows the CPU's batch norm.
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.max_batches = max_batches
        scale = 255.0 * torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.mean = 255.0 * torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.inv_std = 1.0 / scale
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        n = len(self.images)
        if self.drop_last and n < batch_size * self.world:
            per_gpu = f" ({self.world} x {batch_size} per process)" if self.world > 1 else ""
            fail(f"a training split of {n} images is smaller than one batch of {batch_size * self.world}{per_gpu}")

    @property
    def global_batch_size(self):
        return self.batch_size * self.world

    def __len__(self):
        n, b = len(self.images), self.global_batch_size
        batches = n // b if self.drop_last else math.ceil(n / b)
        return min(batches, self.max_batches) if self.max_batches else batches

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # a checkpoint mapped to the GPU holds it there

    def augment(self, x, part=None):
        """uint8 B x C x H x W -> normalised float32 (channels_last when asked).

        part=(start, total): x is images start.. of a global batch of `total`; the random numbers
        are drawn for the whole global batch and x gets its own rows of them."""
        B, C, H, W = x.shape
        start, total = part if part is not None else (0, B)
        rows_of_x = slice(start, start + B)
        if self.train and (self.crop_pad or self.flip):
            p = self.crop_pad
            ar_h = torch.arange(H, device=self.device)
            ar_w = torch.arange(W, device=self.device)
            oy = torch.randint(0, 2 * p + 1, (total, 1), device=self.device, generator=self.generator)[rows_of_x]
            ox = torch.randint(0, 2 * p + 1, (total, 1), device=self.device, generator=self.generator)[rows_of_x]
            cols = ox + ar_w
            if self.flip:
                flipped = torch.rand(total, 1, device=self.device, generator=self.generator)[rows_of_x] < 0.5
                cols = torch.where(flipped, ox + (W - 1 - ar_w), cols)
            padded = F.pad(x, (p, p, p, p), value=self.fill) if p else x
            rows = oy + ar_h
            # Advanced indexing yields B x H x W x C, i.e. channels_last once permuted.
            x = padded[torch.arange(B, device=self.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
            x = x.permute(0, 3, 1, 2)
        elif self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = (x.float() - self.mean) * self.inv_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.contiguous()
        return x

    def __iter__(self):
        n = len(self.images)
        if self.train:
            order = torch.randperm(n, device=self.device, generator=self.generator)
        else:
            order = torch.arange(n, device=self.device)
        b = self.global_batch_size
        for i in range(len(self)):
            idx = order[i * b : (i + 1) * b]
            part = None
            if self.world > 1:  # this rank's contiguous part; a short last batch splits as evenly as it can
                total = len(idx)
                start = self.rank * (total // self.world) + min(self.rank, total % self.world)
                idx = idx[start : start + total // self.world + (self.rank < total % self.world)]
                part = (start, total)
            x = self.augment(self.images[idx], part)
            ys = tuple(l[idx] for l in self.labels)
            yield x, (ys[0] if self.single else ys)


# =============================================================================================
# 3. Backbones shared by several scripts: the interface (stem, stages, head), He et al.'s CIFAR ResNet
#    (hiernet.py's backbone, bench.py's), VGG, weight init.
#    A backbone that one script uses lives in that script.
# =============================================================================================


# Every backbone has `stem`, `stages` (an nn.ModuleList), `head` (pool + flatten + fc) and
# `features(x)` (the pooled vector before the classifier), so a script can cut the network at
# a stage or a block.
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class Head(nn.Module):
    """Global average pooling, flatten, one linear layer."""

    def __init__(self, cin, num_classes, pre=None):
        super().__init__()
        self.pre = pre or nn.Identity()  # e.g. the final BN-ReLU of pre-activation nets
        self.fc = nn.Linear(cin, num_classes)

    def pool(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.pre(x), 1), 1)

    def forward(self, x):
        return self.fc(self.pool(x))


class Backbone(nn.Module):
    """stem -> stages -> head; `features` returns the pooled vector."""

    def features(self, x):
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.head.pool(x)

    def forward(self, x):
        return self.head.fc(self.features(x))


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample and pad the new channels with zeros (no parameters)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.stride, self.extra = stride, cout - cin

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return x


class CifarBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, ReLU (He et al. 2016).

    With elu=True, the block of Shah et al. (2016): conv-ELU-conv-BN + shortcut, no
    activation after the addition."""

    def __init__(self, cin, cout, stride=1, elu=False):
        super().__init__()
        self.elu = elu
        self.conv1, self.conv2 = conv3x3(cin, cout, stride), conv3x3(cout, cout)
        self.bn1 = nn.Identity() if elu else nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = ShortcutA(cin, cout, stride) if (stride > 1 or cin != cout) else nn.Identity()

    def forward(self, x):
        if self.elu:
            out = self.bn2(self.conv2(F.elu(self.conv1(x))))
            return out + self.shortcut(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """The 6n+2-layer CIFAR ResNet of He et al. (2016), widths 16/32/64, option-A shortcuts.

    n = 3, 5, 7, 9, 18 gives ResNet-20, 32, 44, 56, 110. `blocks` lists the 3n residual blocks
    in order, which is what HierNet splits."""

    def __init__(self, n=3, num_classes=10, elu=False, in_channels=3):
        super().__init__()
        self.n, self.elu = n, elu
        act = nn.ELU() if elu else nn.ReLU()
        self.stem = nn.Sequential(conv3x3(in_channels, 16), nn.BatchNorm2d(16), act)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(cin, width, stride, elu))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = Head(64, num_classes)
        init_weights(self)

    @property
    def blocks(self):
        return [b for stage in self.stages for b in stage]


VGG_CONFIGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(Backbone):
    """VGG-11/13/16 with batch norm after every convolution, for 32x32 inputs.

    The five conv stages end in max-pools, leaving 512 x 1 x 1 features for 32x32 inputs.
    The classifier is an MLP: dropout before each hidden linear layer, e.g. hidden=(512, 512)."""

    def __init__(self, depth=16, num_classes=10, hidden=(512, 512), dropout=0.5, in_channels=3):
        super().__init__()
        stages, layers, cin = [], [], in_channels
        for v in VGG_CONFIGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                stages.append(nn.Sequential(*layers))
                layers = []
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(stages)
        self.head = MLPHead(512, num_classes, hidden, dropout)
        init_weights(self)


class MLPHead(nn.Module):
    """pool + flatten, then [dropout, linear, ReLU] per hidden layer, then the last linear."""

    def __init__(self, cin, num_classes, hidden=(), dropout=0.0):
        super().__init__()
        layers, c = [], cin
        for h in hidden:
            layers += [nn.Dropout(dropout), nn.Linear(c, h), nn.ReLU(inplace=True)]
            c = h
        if hidden:
            layers.append(nn.Dropout(dropout))
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(c, num_classes)

    def pool(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def fc(self, x):
        return self.out(self.hidden(x))

    def forward(self, x):
        return self.fc(self.pool(x))


def init_weights(model):
    """He (fan-out) init for convolutions, BN to (1, 0); linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def to_device_model(model, device):
    """Move a model to the device, channels_last on CUDA."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# =============================================================================================
# 4. Training: optimizers, schedules, the train step (bf16 autocast, channels_last, CUDA graph),
#    the epoch and `fit` (checkpoints, resume)
# =============================================================================================


def make_sgd(params, lr, momentum=0.9, weight_decay=1e-4, nesterov=False):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def make_adam(params, lr, weight_decay=0.0, device="cpu"):
    # On CUDA: capturable keeps Adam's step counter on the device, which a CUDA graph needs, and
    # fused updates each parameter in one pass over its weights, gradient and moments (the
    # multi-tensor form makes a pass per arithmetic step). The same update rule (L2 weight decay
    # added to the gradient); `bench.py --mps --mps-optimizer adam_foreach adam` times the two.
    on_cuda = torch.device(device).type == "cuda"
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, capturable=on_cuda, fused=on_cuda or None)


def piecewise_lr(boundaries, values):
    """lr_at(step): values[i] until boundaries[i] iterations, the last value after."""
    if len(values) != len(boundaries) + 1:
        raise ValueError("piecewise_lr needs one more value than boundaries")

    def lr_at(step):
        for b, v in zip(boundaries, values):
            if step < b:
                return v
        return values[-1]

    return lr_at


def autocast(device, dtype="bf16", cache_enabled=True):
    """bf16 autocast on CUDA; a no-op on the CPU (fp32 there)."""
    device = torch.device(device)
    enabled = device.type == "cuda" and dtype == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)


def _as_stats(out):
    if isinstance(out, torch.Tensor):
        return out, {"loss": out.detach()}
    loss, stats = out
    return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}}


def make_train_step(
    model, loss_fn, optimizer, *, device, dtype="bf16", cuda_graph=True, compile=False, compile_loss=False
):
    """One optimisation step: step(x, y) -> dict of 0-dim device tensors (no host sync).

    loss_fn(model, x, y) returns the loss, or (loss, {name: 0-dim tensor}) for more statistics
    (sums or means over the batch). On CUDA with cuda_graph, forward, backward and optimizer
    step are captured once into one CUDA graph and replayed; the graph is captured again when
    the learning rate changes (it is baked into the graph). The returned tensors are reused by
    the next call: accumulate them before calling again. compile=True: loss_fn gets the
    torch.compile'd model (same parameters; inductor fuses the BatchNorm, activation and
    residual arithmetic between the convolutions). Compiled and graphed together, the warm-up
    steps compile (under the capture's autocast settings, so that the capture finds the code
    compiled: compiling cannot happen inside a graph capture) and the compiled kernels are then
    captured and replayed like eager ones. compile=(block classes): regional compilation, each
    submodule of those classes compiled in place (nn.Module.compile) and the rest eager; the
    repeated blocks of a ResNet then compile once per shape, and the graph breaks between them
    cost nothing once the step is a CUDA graph. compile=True with compile_loss=True: the model and
    loss_fn compiled as one function, so that the loss's own small kernels (several cross-entropies,
    gathers, the statistics) fuse too; for a loss with no graph break and nothing that changes between
    steps (a Python value it reads would recompile it).

    Under --distributed ddp the model is wrapped by distributed_model (gradients averaged over
    the ranks in backward) and no CUDA graph is captured: DDP's gradient all-reduce runs from
    autograd hooks on NCCL streams and rebuilds its gradient buckets after the first steps,
    neither of which a graph capture records safely without DDP's static-graph setup, which
    this loop does not use. (Per-rank work is then eager, as with --no-cuda-graph.)"""
    device = torch.device(device)
    forward_calls = [0]
    if ddp_active():
        model = distributed_model(model)
        model.register_forward_pre_hook(lambda *_: forward_calls.__setitem__(0, forward_calls[0] + 1))
        cuda_graph = False

    def model_and_loss(x, y):  # reads `model` when called: the compiled one where it is replaced below
        return loss_fn(model, x, y)

    if isinstance(compile, tuple):
        compile_blocks(model, compile)
    elif compile and compile_loss and not ddp_active():  # the model and its loss as one (under ddp, the model)
        model_and_loss = torch.compile(model_and_loss)
    elif compile:
        model = torch.compile(model)
    graphed_compile = bool(compile) and cuda_graph and device.type == "cuda"

    def eager(x, y):
        optimizer.zero_grad(set_to_none=True)
        before = forward_calls[0]
        with autocast(device, dtype, cache_enabled=not graphed_compile):
            loss, stats = _as_stats(model_and_loss(x, y))
        if ddp_active() and forward_calls[0] == before:
            fail(
                "--distributed ddp: this loss calls the model's parts but not the model itself, so DDP would "
                "not average its gradients; run it in one process"
            )
        loss.backward()
        optimizer.step()
        return stats

    if device.type != "cuda" or not cuda_graph:
        return eager

    state = {"graph": None, "lr": None, "warm": 0}

    def lrs():
        return tuple(g["lr"] for g in optimizer.param_groups)

    def graphed(x, y):
        if state["warm"] < 3:  # warm-up steps on a side stream, as graph capture requires
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                stats = eager(x, y)
            torch.cuda.current_stream().wait_stream(side)
            state["warm"] += 1
            return stats
        if state["graph"] is None or state["lr"] != lrs():
            state["graph"] = None
            state["x"] = x.clone()
            state["y"] = y.clone() if isinstance(y, torch.Tensor) else tuple(t.clone() for t in y)
            optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                with autocast(device, dtype, cache_enabled=False):
                    loss, stats = _as_stats(model_and_loss(state["x"], state["y"]))
                loss.backward()
                optimizer.step()
            state.update(graph=graph, lr=lrs(), stats=stats)
        state["x"].copy_(x)
        if isinstance(y, torch.Tensor):
            state["y"].copy_(y)
        else:
            for dst, src in zip(state["y"], y):
                dst.copy_(src)
        state["graph"].replay()
        return state["stats"]

    return graphed


def compile_blocks(model, block_classes):
    """torch.compile, in place, every submodule of model that is an instance of block_classes
    (the outermost one where such blocks nest); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, block_classes)]
    inner = {id(c) for b in blocks for c in b.modules() if c is not b}
    outer = [b for b in blocks if id(b) not in inner]
    if not outer:
        fail(f"regional compilation: no {', '.join(c.__name__ for c in block_classes)} in {type(model).__name__}")
    for block in outer:
        block.compile()
    return len(outer)


def cross_entropy_loss(model, x, y):
    """The plain classification loss_fn: (mean cross-entropy, {'correct': count})."""
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    return loss, {"correct": (logits.argmax(1) == y).sum()}


def train_epoch(step, loader, optimizer, lr_at, start_step):
    """Run one epoch; returns ({stat: sum over batches} on the device, images seen, steps).

    The learning rate is set from lr_at(global step) before each step (host-side only)."""
    sums, images, n = {}, 0, start_step
    for x, y in loader:
        lr = lr_at(n)
        for g in optimizer.param_groups:
            g["lr"] = lr
        stats = step(x, y)
        for k, v in stats.items():
            sums[k] = sums[k] + v if k in sums else v.clone()
        images += len(x)
        n += 1
    return sums, images, n


def _sum_over_ranks(sums, images, device):
    """An epoch's {stat: device sum} and image count, each added over the ddp ranks (one all_reduce)."""
    keys = sorted(sums)
    flat = torch.stack(
        [sums[k].double().reshape(()) for k in keys] + [torch.tensor(float(images), dtype=torch.float64, device=device)]
    )
    torch.distributed.all_reduce(flat)
    return {k: flat[i] for i, k in enumerate(keys)}, round(flat[-1].item())


def fit(
    stage_dir,
    model,
    optimizer,
    step,
    loader,
    *,
    epochs,
    lr_at,
    evaluate=None,
    extra_state=None,
    log_path=None,
    stage="train",
    on_epoch_end=None,
):
    """Train `epochs` epochs with a checkpoint after each (every --checkpoint-every epochs, and after
    the last); continue from stage_dir/checkpoint.pt.

    evaluate(epoch) -> dict of metrics (validation only); on_epoch_end(epoch, record) may change
    state (e.g. a plateau schedule, class centres); extra_state maps names to objects with
    state_dict()/load_state_dict() saved in the checkpoint. Every epoch appends one line to
    log_path (metrics.jsonl) and prints one progress line with ETA. A non-finite loss stops the
    run with an error; the last good checkpoint stays. Ctrl-C stops with one line naming the last
    checkpoint and exit status 130. Checkpoints hold tensors and plain values only (RNG states
    included), so they load with weights_only=True. Returns the list of epoch records.

    Under --distributed ddp every rank runs fit on its shard of the batches (GpuLoader), the
    epoch's summed statistics and image counts are added over the ranks before the record is
    made (so train loss and accuracy cover every rank), every rank evaluates the same way (the
    records agree, and so do schedules that read them), and rank 0 alone writes the checkpoint
    and the log.

    The checkpoint and the epochs' log lines since the last one are written together by a
    CheckpointWriter while the next epoch trains, so the log never runs ahead of the checkpoint (a
    resume would log the epochs after it again); fit returns (or stops on Ctrl-C) only after the
    last write is on disk."""
    stage_dir = Path(stage_dir)
    if writes_files():
        _claim(stage_dir)
        try:
            stage_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _cannot(f"create {stage_dir}", e)
    ckpt_path = stage_dir / "checkpoint.pt"
    extra_state = extra_state or {}
    device = next(model.parameters()).device
    epoch, global_step, history = 0, 0, []
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            loader.load_state_dict(ckpt["loader"])
            for name, obj in extra_state.items():
                obj.load_state_dict(ckpt["extra"][name])
            epoch, global_step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            fail(f"{ckpt_path}: {_misfit(model, e)}")
        set_rng_state(ckpt["rng"], device)
        if epoch < epochs:
            print(f"[{stage}] resuming from {ckpt_path} at epoch {epoch}/{epochs}", flush=True)
    started = time.time()
    first_epoch = epoch
    writer, saved = CheckpointWriter(), epoch  # saved: the epochs in the checkpoint on disk (history[:saved])
    every = getattr(_RUN["args"], "checkpoint_every", 1)  # --checkpoint-every of the run set up (1 without one)
    try:
        while epoch < epochs:
            model.train()
            t0 = time.time()
            sums, images, global_step = train_epoch(step, loader, optimizer, lr_at, global_step)
            batches = len(loader)
            if ddp_active():  # every rank's batches: sums and image counts added over the ranks
                sums, images = _sum_over_ranks(sums, images, device)
                batches *= world_size()
            means = {k: v.item() / batches for k, v in sums.items() if k != "correct"}  # one sync per epoch
            if "correct" in sums:
                means["train_acc"] = 100.0 * sums["correct"].item() / max(images, 1)
            if not all(math.isfinite(v) for v in means.values()):
                writer.wait()
                where = (
                    f"the last good checkpoint is {ckpt_path}"
                    if ckpt_path.exists()
                    else "no checkpoint was written yet"
                )
                fail(f"[{stage}] non-finite loss in epoch {epoch + 1} ({means}); {where}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.time() - t0
            record = {
                "stage": stage,
                "epoch": epoch + 1,
                "step": global_step,
                "lr": optimizer.param_groups[0]["lr"],
                **means,
                "seconds": round(seconds, 3),
                "images_per_s": round(images / max(seconds, 1e-9), 1),
            }
            if evaluate is not None:
                model.eval()
                record.update(evaluate(epoch + 1))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
            epoch += 1
            history.append(record)
            if writes_files() and (epoch % every == 0 or epoch == epochs):
                writer.submit(
                    ckpt_path,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "loader": loader.state_dict(),
                        "extra": {k: _weights_only_safe(v.state_dict()) for k, v in extra_state.items()},
                        "epoch": epoch,
                        "epochs": epochs,  # the stage's length: epoch == epochs marks it finished (gpu_runs --park)
                        "step": global_step,
                        "history": _plain(history),
                        "rng": get_rng_state(device),
                    },
                    log_path,
                    history[saved:],  # the log lines of the epochs since the last checkpoint
                )
                saved = epoch
            if ddp_active():  # the ranks leave each epoch together; a sweep's processes train apart
                barrier()
            elapsed = time.time() - started
            eta = elapsed / (epoch - first_epoch) * (epochs - epoch)
            shown = " ".join(
                f"{k} {v:.4g}"
                for k, v in record.items()
                if k not in ("stage", "epoch", "step", "seconds") and isinstance(v, (int, float))
            )
            if writes_files():
                print(
                    f"[{stage}] epoch {epoch}/{epochs} {shown} | {seconds:.1f}s ETA {format_seconds(eta)}", flush=True
                )
        writer.wait()
    except KeyboardInterrupt:
        writer.wait()
        where = f"the last checkpoint is {ckpt_path}" if ckpt_path.exists() else "no checkpoint was written yet"
        again = f"; continue with --resume {_RUN['dir']}" if _RUN["dir"] is not None and ckpt_path.exists() else ""
        print(f"[{stage}] interrupted in epoch {epoch + 1}; {where}{again}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    model.eval()
    return history


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# =============================================================================================
# 5. Evaluation and metrics: predict, accuracies, hierarchical measures, inference images/s
# =============================================================================================


@torch.no_grad()
def predict(forward, loader, *, device, dtype="bf16"):
    """Run forward(x) over a loader; returns (outputs, labels) concatenated on the CPU.

    forward may return a tensor or a tuple of tensors (then outputs is a tuple); outputs are
    float32."""
    outs, labels = [], []
    for x, y in loader:
        with autocast(device, dtype):
            out = forward(x)
        outs.append(tuple(o.float() for o in out) if isinstance(out, (tuple, list)) else out.float())
        labels.append(y)
    if isinstance(labels[0], torch.Tensor):
        labels = torch.cat(labels).cpu()
    else:
        labels = tuple(torch.cat(parts).cpu() for parts in zip(*labels))
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts).cpu() for parts in zip(*outs)), labels
    return torch.cat(outs).cpu(), labels


def ranked_classes(scores, k):
    """The k best-scored classes of every row, best first (k capped at C). Tie rule: equal scores
    rank the lower class index first (a stable sort), as argmax takes the first maximum, so top-1
    and top-k come from one ranking (topk orders ties as it likes: constant scores gave top-1
    100% and top-5 0%)."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, : min(k, scores.shape[1])]


def accuracy(scores, labels):
    """Top-1 accuracy in percent (ties: the lower class index, as in ranked_classes)."""
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def level_accuracies(fine_scores, labels, hierarchy):
    """Accuracy at every level when coarse scores are the summed fine probabilities."""
    probs = fine_scores.float().softmax(1)
    result = {}
    for level, name in enumerate(hierarchy.level_names):
        parent = torch.as_tensor(hierarchy.parents[level])
        coarse = torch.zeros(len(probs), hierarchy.num_classes(level)).index_add_(1, parent, probs)
        result[name] = accuracy(coarse, parent[labels])
    return result


def lca_heights(hierarchy):
    """C x C int64 tensor: height of the lowest common ancestor of fine classes a and b.

    Fine classes (leaves) sit at height 0 and an implicit root above the coarsest level at
    height n_levels; two classes that first differ below k shared levels meet at height
    n_levels - k (so 0 when a == b, n_levels when they differ already at level 0)."""
    parents = torch.as_tensor(np.stack(hierarchy.parents))  # L x C
    same = parents[:, :, None] == parents[:, None, :]  # L x C x C
    shared_levels = same.long().cumprod(0).sum(0)  # leading levels, coarsest first, in common
    return hierarchy.n_levels - shared_levels


def shared_ancestors(hierarchy):
    """C x C int64 tensor: size of the intersection of the two classes' ancestor sets.

    A class's set holds its class at every level (itself included, the root excluded), so every
    set has n_levels members."""
    parents = torch.as_tensor(np.stack(hierarchy.parents))
    return (parents[:, :, None] == parents[:, None, :]).long().sum(0)


@torch.no_grad()
def hierarchical_metrics(scores, labels, hierarchy, level_preds=None):
    """Flat and hierarchical measures of fine-class scores; a JSON-ready dict.

    scores: N x C logits, log-probabilities or probabilities. The ranking does not care (top-1 and
    top-k come from one ranking, ties to the lower class index: ranked_classes); for the level
    accuracies, each row that is all non-negative and sums to 1 (within 1e-3) is taken as
    probabilities as it is, any other row is soft-maxed (as `level_accuracies` does); one row
    decides for itself only. labels: N fine labels.
    level_preds: optional {level name: N labels predicted at that level by the model's own level
    heads}. Tensors (any device) or arrays; the measures are computed on the CPU.

    top1, top5, level_acc ({level: %}, coarse scores = summed fine probabilities): in %.
    mistake_severity: mean LCA height of predicted and true class over the top-1 mistakes only
      (Bertinetto et al. 2020); None when there is no mistake (None, not NaN, to stay valid JSON).
    hdist@1, hdist@5: mean LCA height between the true class and each of the k top-scored
      classes, over all images (k capped at C).
    hprecision, hrecall, hf1: each class augmented with its ancestors (root excluded), summed
      intersections over summed set sizes, micro-averaged over images (Kosmopoulos et al. 2015),
      in %. With one leaf label per image and every leaf at full depth both sets have n_levels
      members, so the three are equal; they are kept apart to stay the measures as defined.
    consistency (only with level_preds): % of images whose given level predictions all equal the
      ancestors, at those levels, of the top-1 fine prediction."""
    scores = torch.as_tensor(scores).float().cpu()
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    n_classes = hierarchy.num_classes()
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        fail(f"hierarchical_metrics: scores of shape {tuple(scores.shape)}, expected N x {n_classes}")
    if len(labels) != len(scores) or len(labels) == 0:
        fail(f"hierarchical_metrics: {len(labels)} labels for {len(scores)} score rows (need as many, at least one)")
    probability_rows = (scores >= 0).all(1) & ((scores.sum(1) - 1).abs() <= 1e-3)
    heights = lca_heights(hierarchy).float()
    top = ranked_classes(scores, 5)
    pred = top[:, 0]
    mistakes = pred != labels
    overlap = shared_ancestors(hierarchy)[pred, labels].sum().item()
    set_size = hierarchy.n_levels * len(labels)  # every class's ancestor set has n_levels members
    hprecision = 100.0 * overlap / set_size  # summed |pred set|
    hrecall = 100.0 * overlap / set_size  # summed |true set|
    result = {
        "top1": 100.0 * (pred == labels).float().mean().item(),
        "top5": 100.0 * (top == labels[:, None]).any(1).float().mean().item(),
        # log turns probabilities into log-probabilities, which level_accuracies' softmax maps back.
        "level_acc": level_accuracies(torch.where(probability_rows[:, None], scores.log(), scores), labels, hierarchy),
        "mistake_severity": heights[pred[mistakes], labels[mistakes]].mean().item() if mistakes.any() else None,
        "hdist@1": heights[pred, labels].mean().item(),
        "hdist@5": heights[top, labels[:, None]].mean().item(),
        "hprecision": hprecision,
        "hrecall": hrecall,
        "hf1": 2 * hprecision * hrecall / (hprecision + hrecall) if hprecision + hrecall > 0 else 0.0,
    }
    if level_preds is not None:
        if not level_preds:
            fail("hierarchical_metrics: level_preds is empty; pass None when the model has no level heads")
        agree = torch.ones(len(labels), dtype=torch.bool)
        for name, level_pred in level_preds.items():
            if name not in hierarchy.level_names:
                fail(f"hierarchical_metrics: level {name!r} not in the hierarchy's levels {hierarchy.level_names}")
            level_pred = torch.as_tensor(level_pred).long().reshape(-1).cpu()
            if len(level_pred) != len(labels):
                fail(f"hierarchical_metrics: {len(level_pred)} '{name}' predictions for {len(labels)} images")
            agree &= level_pred == hierarchy.labels(name, pred)
        result["consistency"] = 100.0 * agree.float().mean().item()
    return result


def measure_throughput(forward, x, *, device, dtype="bf16", iters=20, warmup=5):
    """Inference images/s of forward on the batch x (device-synchronised wall clock)."""
    device = torch.device(device)
    for _ in range(warmup):
        with autocast(device, dtype):
            forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        with autocast(device, dtype):
            forward(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return iters * len(x) / (time.perf_counter() - t0)


# =============================================================================================
# 6. Runs: the shared flags and what a resume may change, run directories (setup, locks, the
#    files a run wrote), the data's fingerprint, atomic files, checkpoints and RNG states
# =============================================================================================


# ---- The shared flags (argparse types, add_common_args) and what a resume may change (parse_args)

# argparse `type=` checks: an impossible value stops at parse time with the usage and one line
# ("argument --epochs: must be at least 1, got 0"), exit status 2, before anything is loaded.


def _number_check(name, kind, ok, rule):
    """An argparse `type=` named `name`: the text as `kind` (int or float), refused with
    "<rule>, got <text>" unless ok(value)."""

    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{rule}, got {text}")
        return value

    check.__name__ = check.__qualname__ = name
    return check


positive_int = _number_check("positive_int", int, lambda v: v >= 1, "must be at least 1")  # epochs, sizes, counts
nonneg_int = _number_check("nonneg_int", int, lambda v: v >= 0, "must be at least 0")
seed_int = _number_check("seed_int", int, lambda v: 0 <= v < 2**32, f"must be in 0..{2**32 - 1}")  # numpy's seeds
positive_float = _number_check(  # learning rates
    "positive_float", float, lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"
)
nonneg_float = _number_check(  # loss weights, weight decay
    "nonneg_float", float, lambda v: math.isfinite(v) and v >= 0, "must be a finite number >= 0"
)
fraction = _number_check("fraction", float, lambda v: 0 <= v < 1, "must be in [0, 1)")  # momentum, dropout
positive_fraction = _number_check(  # a held-out share, a decay factor
    "positive_fraction", float, lambda v: 0 < v < 1, "must be in (0, 1)"
)


def nonempty(text):
    """A path or a text value: an empty (or blank) one is refused, not read as the flag left out
    (`--resume ""` from an unset shell variable would otherwise start a new run)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def device_name(text):
    """auto, cpu, cuda, cuda:N or mps; whether the device exists is checked by get_device."""
    kind, _, index = text.partition(":")
    if text in ("auto", "cpu", "cuda", "mps") or (kind == "cuda" and index.isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")


def one_line_errors(parser):
    """Make the parser refuse a flag in one line, `prog: error: ... (prog -h lists the flags)`, exit
    status 2, instead of argparse's usage block (20-30 lines) before it. Returns the parser."""

    def error(message):
        parser.exit(2, f"{parser.prog}: error: {message} ({parser.prog} -h lists the flags)\n")

    parser.error = error
    return parser


def add_common_args(parser, *, epochs, batch_size, lr, dataset="shapes", datasets=DATASETS, distributed="ddp"):
    """The flags every script shares; the defaults passed in are the script's paper settings.

    `distributed` is what the script does when started by torchrun with several processes
    (see init_distributed); a plain `python script.py` ignores --distributed."""
    one_line_errors(parser)
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default=dataset, choices=datasets)
    g.add_argument("--data-dir", type=nonempty, default="./data", help="root of the on-disk datasets")
    g.add_argument("--hierarchy", type=nonempty, help="JSON {coarse: [fine, ...]} (nested for more levels)")
    g.add_argument("--image-size", type=positive_int, default=None, help="shapes/folder image side (shapes default 64)")
    g.add_argument("--train-size", type=positive_int, default=20000, help="shapes: number of training images")
    g.add_argument("--test-size", type=positive_int, default=6000, help="shapes: number of test images")
    g.add_argument("--seed", type=seed_int, default=0)
    g.add_argument("--device", type=device_name, default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--epochs", type=positive_int, default=epochs)
    g.add_argument("--batch-size", type=positive_int, default=batch_size)
    g.add_argument("--lr", type=positive_float, default=lr)
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on CUDA (CPU: fp32)")
    g.add_argument("--out-dir", type=nonempty, help="run directory (default runs/<script>-<time>)")
    g.add_argument("--resume", type=nonempty, metavar="DIR", help="continue the run in DIR where it stopped")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out-dir")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="one epoch of two batches per stage, on small settings for the flags not given (shapes data)",
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the model (then CUDA-graphed, unless --no-cuda-graph)"
    )
    g.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=1,
        metavar="EPOCHS",
        help="checkpoint every EPOCHS epochs and at each stage's end; a resume goes on from the last one",
    )
    g.add_argument(
        "--distributed",
        default=distributed,
        choices=("ddp", "sweep"),
        help="under torchrun only (WORLD_SIZE > 1): ddp = one run over the GPUs (--batch-size per GPU), "
        "sweep = each process its own share of independent runs",
    )
    g.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture the whole train step in one CUDA graph",
    )
    return parser


# Flags a resume may change: where and how fast the same arithmetic runs. --dtype is not among
# them (bf16 and fp32 are different experiments); --data-dir is, except for --dataset folder,
# where the folder is the dataset. Run lengths that may grow are each script's resume_longer.
RESUME_SAFE = ("device", "cuda_graph", "compile", "checkpoint_every")


def read_run_args(run_dir, flag="--resume"):
    """A run directory's args.json as a dict (one line on failure)."""
    path = Path(run_dir) / "args.json"
    if not path.is_file():
        fail(f"{flag} {run_dir}: no args.json there; not a run directory")
    saved = _read_run_json(run_dir, "args.json", flag)
    if not isinstance(saved, dict):
        fail(f"{flag} {run_dir}: args.json holds no settings object; the run directory is damaged")
    return saved


def run_settings(saved):
    """The settings a run continues with: args.json's flags with its recorded overrides applied."""
    settings = {k: v for k, v in saved.items() if k not in ("script", "overrides")}
    try:
        for override in saved.get("overrides", []):
            settings.update({k: change["to"] for k, change in override["changes"].items()})
    except (AttributeError, KeyError, TypeError):
        fail("args.json: its overrides list is damaged; each entry is {time, changes: {flag: {from, to}}}")
    return settings


def _read_run_json(run_dir, name, flag="--resume"):
    """A JSON file of a run directory; one that does not parse stops with one line (the run is damaged)."""
    try:
        return json.loads((Path(run_dir) / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        fail(f"{flag} {run_dir}: {name} is unreadable ({e}); the run directory is damaged")


def _names_no_script(flag, run_dir):
    """The start of the line refusing a run directory whose args.json names no script."""
    return f"{flag} {run_dir}: its args.json names no script (written before run directories recorded theirs)"


def check_run_script(saved, script, run_dir, flag="--resume"):
    """Fail unless args.json says the run directory was written by `script`."""
    owner = saved.get("script")
    if owner is None:
        fail(f'{_names_no_script(flag, run_dir)}; add "script": "{script}" to it if it is a {script} run')
    if owner != script:
        fail(f"{flag} {run_dir}: a {owner} run, not a {script} run")


def _plain(obj):
    """obj as JSON would give it back: numpy and tensor values to Python ones, tuples to lists."""
    return json.loads(json.dumps(obj, default=_json_default))


def _given_flags(parser, argv):
    """{dest: value} of the flags given on the command line (not from defaults)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=ns)
    return {k: v for k, v in vars(ns).items() if v is not unset}


# What a --dry-run uses for the flags the command line does not give (a new run only; a resumed
# dry run keeps its own): the synthetic shapes data, small, so that every script's dry run takes
# well under a minute on two CPU cores. Scripts add their own (a small model, fewer runs).
DRY_RUN_DEFAULTS = {"dataset": "shapes", "train_size": 1024, "test_size": 256, "image_size": 32, "batch_size": 32}


def _apply_dry_run_defaults(parser, argv, args, script_defaults):
    """Set DRY_RUN_DEFAULTS and the script's on args, for the flags not given; one line says which."""
    given = _given_flags(parser, argv)
    values = {**DRY_RUN_DEFAULTS, **(script_defaults or {})}
    dataset = given.get("dataset", values["dataset"])
    if dataset != "shapes":  # sizes and the image side are the shapes data's alone
        values = {k: v for k, v in values.items() if k not in ("train_size", "test_size", "image_size")}
    options = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    applied = {k: v for k, v in values.items() if k not in given and k in options}
    for dest, value in applied.items():
        applied[dest] = value(args) if callable(value) else value  # a value that depends on other flags
        setattr(args, dest, applied[dest])
    if applied:
        shown = " ".join(
            f"{options[k]} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in applied.items()
        )
        print(f"dry run: {shown} (a flag given keeps its value)", flush=True)


def parse_args(
    parser, argv=None, *, script=None, resume_longer=("epochs",), resume_safe=(), dry_run=None, before_flags=None
):
    """Parse argv; with --resume DIR, the run's saved settings fill every flag not given. A setting the
    run's args.json lacks (the run predates its flag) takes the script's `before_flags` {dest: value},
    what such a run did, else the flag's default.

    A new --dry-run takes DRY_RUN_DEFAULTS and the script's `dry_run` {dest: value} for the flags
    the command line does not give (the paper's defaults stay those of real runs).

    A resume continues the same experiment: DIR must be a run of `script`, and a flag that
    differs from the run's value is refused (one line naming it) unless it is in RESUME_SAFE,
    --data-dir (not for --dataset folder), a script's own `resume_safe` flags (ones that pick what
    a call does, not what the experiment is), or a run length in `resume_longer` that grows. What
    a script may lengthen is its choice: stages that later stages build on are not extended."""
    args = parser.parse_args(argv)
    if not args.resume:
        if args.dry_run:
            _apply_dry_run_defaults(parser, argv, args, dry_run)
        return args
    if args.force:
        fail("--resume continues a run and --force starts one over; give one of them")
    saved = read_run_args(args.resume)
    if script is not None:
        check_run_script(saved, script, args.resume)
    settings = {**(before_flags or {}), **run_settings(saved)}
    defaults = {a.dest: a.default for a in parser._actions}
    options = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}
    allowed = (
        set(RESUME_SAFE)
        | set(resume_safe)
        | {"resume"}
        | ({"data_dir"} if settings.get("dataset") != "folder" else set())
    )
    longer = () if settings.get("dry_run") else tuple(resume_longer)
    changed, shorter = [], []
    for dest, value in _given_flags(parser, argv).items():
        old = settings.get(dest, defaults.get(dest))
        if dest in allowed or _plain(value) == _plain(old):
            continue
        grows = isinstance(value, int) and isinstance(old, int) and not isinstance(value, bool)
        if dest in longer and grows and value > old:
            continue
        (shorter if dest in longer and grows else changed).append(f"{options.get(dest, dest)} {value} (run: {old})")
    if changed or shorter:
        lengths = ", ".join(options.get(d, d) for d in longer) or "no run length"
        fail(
            f"--resume {args.resume}: {'; '.join(changed + shorter)} would change the experiment; a resume may "
            f"change {', '.join(options[d] for d in (*RESUME_SAFE, *resume_safe))} and --data-dir, and lengthen {lengths}"
            + (" (this is a --dry-run directory)" if settings.get("dry_run") else "")
        )
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in settings.items() if k in known})
    return parser.parse_args(argv)


# ---- Run directories: setup (seed, device, the directory), its lock, the files a run wrote


def seed_everything(seed):
    """The one place where every random generator is seeded."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def get_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        fail(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available here; use --device cpu")
    return device


# This process's run: its directory, the lock files it holds, the directories it created, the
# files waiting for the run's first written file (args.json; the replacement of an old run), the
# args setup was called with (fit reads --checkpoint-every from them), and the run's files it has
# recorded in WRITTEN.
_RUN = {"dir": None, "pending": None, "locks": {}, "created": [], "args": None, "written": set()}

# A run directory's own list of the files the run wrote (paths relative to it, one a line): a run
# reused or cleaned up removes these and nothing else, so a user's files beside them survive.
WRITTEN = ".written"
# Temp files of atomic writes end in this; only these are removed as stale (never a user's *.tmp).
TEMP_SUFFIX = ".hiercls-tmp"


def setup(args, script):
    """Seed, pick the device, and open the run directory: new, resumed or replaced.

    Returns (run_dir, device). Nothing on disk changes before the run writes its first file
    (a checkpoint, a JSON, a log line): until then inputs may still fail, and a run that fails
    on them leaves an existing run intact. At that first write, args.json is saved (with a
    "script" key naming `script`), and a run directory being replaced is renamed aside and
    removed.

    - A new run gets --out-dir, or runs/<script>-<time> (a counter suffix when taken). An
      existing non-empty directory is reused only when it is a run of this script without any
      checkpoint (a run that failed early): the files that run listed in its WRITTEN list go,
      anything else (a user's notes) stays. It is replaced as a whole with --force only when it
      is a run of this script (its args.json says so), and refused otherwise.
    - --resume DIR continues the run (parse_args has checked the flags). Overrides are recorded
      in args.json's "overrides" list ({time, changes: {flag: {from, to}}}); args.json's own
      values stay the run's original ones. A longer --epochs (or a script's other lengths):
      learning-rate schedules are computed by each script from the run length, so the schedule
      is the one of the new length from the first step; epochs already run keep the learning
      rates they had, and the rest follow the new schedule from the step reached. A
      --dry-run directory resumes as a dry run: it cannot become a real run.
    - A lock on DIR/.lock (held for the process's life) refuses a second process on the same run.
    - Stale temp files of killed writes (ours: named *TEMP_SUFFIX) are removed when the
      directory is opened; a user's *.tmp files are not ours.
    - Every file a run writes in its directory is listed in WRITTEN before it is written.
    - Started by torchrun with several processes: init_distributed first (each process on
      cuda:LOCAL_RANK), then rank 0 alone opens the directory (see _setup_run_dir)."""
    _release_run()
    sys.excepthook = _excepthook
    if args.dry_run:
        args.epochs = 1
    seed_everything(args.seed)
    device = get_device(args.device)
    if launched_distributed():
        device = init_distributed(device, mode=getattr(args, "distributed", "ddp"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    run_dir = _setup_run_dir(args, script)
    _RUN.update(dir=run_dir, args=args)
    return run_dir, device


def _open_run_dir(args, script):
    """setup's run directory in this process: checked, created or reused, and locked."""
    if args.resume:
        run_dir = Path(args.resume)
        saved = read_run_args(run_dir)
        check_run_script(saved, script, run_dir)
        _lock(run_dir)
        _remove_stale_temps(run_dir)
        _RUN.update(dir=run_dir, written=_read_written(run_dir))
        settings = run_settings(saved)
        if settings.get("dry_run"):
            print(f"[{script}] {run_dir} is a --dry-run directory: it resumes as a dry run", flush=True)
        current = _plain(vars(args))
        changes = {
            k: {"from": settings[k], "to": v}
            for k, v in current.items()
            if k != "resume" and k in settings and _plain(settings[k]) != v
        }
        files = {}
        if changes:
            when = datetime.datetime.now().isoformat(timespec="seconds")
            saved = {**saved, "overrides": saved.get("overrides", []) + [{"time": when, "changes": changes}]}
            files["args.json"] = _json_bytes(saved)
        _RUN["pending"] = {"dir": run_dir, "files": files, "new": False, "replace": False, "remove": []}
    else:
        run_dir = Path(args.out_dir) if args.out_dir else _new_default_dir(script)
        reuse = _check_out_dir(run_dir, script, args.force)
        if reuse != "directory":
            if not run_dir.exists():
                _RUN["created"].append(run_dir)
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                _cannot(f"create the run directory {run_dir}", e)
        _lock(run_dir)
        _remove_stale_temps(run_dir)
        remove = sorted(_read_written(run_dir)) if reuse == "files" else []
        _RUN.update(dir=run_dir, written=set())
        _RUN["pending"] = {
            "dir": run_dir,
            "files": {"args.json": _json_bytes({"script": script, **_plain(vars(args))})},
            "new": True,
            "replace": reuse == "directory",
            "remove": remove,
        }
    return run_dir


def _setup_run_dir(args, script):
    """The run directory of setup: opened by this process, or, under torchrun, by rank 0 alone.

    Under torchrun rank 0 opens it (lock, args.json, replacement of an old run written at once
    rather than at the first write, so no rank writes into a directory about to be replaced)
    and the other ranks take its path from rank 0 after a barrier, holding no lock."""
    if not is_distributed():
        return _open_run_dir(args, script)
    run_dir = _open_run_dir(args, script) if _DIST["rank"] == 0 else None
    if _DIST["rank"] == 0:
        _claim(run_dir)
    shared = [str(run_dir) if run_dir is not None else None]
    torch.distributed.broadcast_object_list(shared, src=0, group=_DIST["cpu_group"])
    barrier()
    return Path(shared[0])


def _new_default_dir(script):
    """runs/<script>-<time>, created exclusively: jobs started in the same second get -2, -3, ..."""
    stamp = _timestamp()
    for i in range(1, 1000):
        run_dir = Path("runs") / (f"{script}-{stamp}" if i == 1 else f"{script}-{stamp}-{i}")
        try:
            run_dir.mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError as e:
            _cannot(f"create the run directory {run_dir}", e)
        _RUN["created"].append(run_dir)
        return run_dir
    fail(f"runs/{script}-{stamp}: a thousand run directories in one second; pass --out-dir")


def _timestamp():
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _run_contents(run_dir):
    """What a directory holds besides our lock file, list of written files and temp files."""
    return [p for p in run_dir.iterdir() if p.name not in (".lock", WRITTEN) and not p.name.endswith(TEMP_SUFFIX)]


def _check_out_dir(run_dir, script, force):
    """How a new run takes run_dir: None (absent or empty), "files" (an earlier run of this script
    whose own files go at the first write) or "directory" (--force: the whole directory is
    replaced at the first write); fails when it may not be taken."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        fail(f"--out-dir {run_dir} is a file, not a directory")
    if not _run_contents(run_dir):
        return None
    here = Path.cwd().resolve()
    if run_dir.resolve() in (here, *here.parents):
        fail(f"--out-dir {run_dir} is the working directory or holds it; choose a new directory")
    try:
        saved = json.loads((run_dir / "args.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        saved = None
    owner = saved.get("script") if isinstance(saved, dict) else None
    if not force and owner == script and (run_dir / WRITTEN).is_file() and not any(run_dir.rglob("checkpoint.pt")):
        return "files"  # a run of this script that failed before its first checkpoint: its files, listed, go
    if not force:
        fail(f"{run_dir} exists and is not empty; pass --resume {run_dir} to continue it or --force to replace it")
    if saved is None:
        fail(f"--force {run_dir}: not a run directory (no readable args.json); refusing to delete it")
    if owner is None:
        fail(f"{_names_no_script('--force', run_dir)}; refusing to delete it; remove it yourself if it is to go")
    if owner != script:
        fail(f"--force {run_dir}: a {owner} run, not a {script} run; refusing to replace it")
    return "directory"


def _lock(run_dir):
    """Hold an exclusive lock on run_dir/.lock for this process's life (one line when taken)."""
    key = str(Path(run_dir).resolve())
    if key in _RUN["locks"]:
        return
    path = Path(run_dir) / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as e:
        _cannot(f"write in {run_dir}", e)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        fail(f"{run_dir} is in use by another process{f' (pid {other})' if other else ''}; wait until it ends")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _RUN["locks"][key] = fd


def _release_run():
    """Forget the previous run of this process (several runs in one process, as in tests)."""
    for fd in _RUN["locks"].values():
        os.close(fd)
    _RUN.update(dir=None, pending=None, locks={}, args=None, written=set())


def _remove_stale_temps(run_dir):
    """Our temp files of writes killed half-way (checkpoints, JSON); we hold the lock, so none is live."""
    for tmp in Path(run_dir).rglob(f"*{TEMP_SUFFIX}"):
        try:
            tmp.unlink()
        except OSError:
            pass


def _read_written(run_dir):
    """The run's list of the files it wrote (a torn last line, from a kill mid-write, is left out)."""
    try:
        lines = (Path(run_dir) / WRITTEN).read_text().split("\n")
    except (OSError, UnicodeDecodeError):
        return set()
    return {line for line in lines[:-1] if line}


def _record_written(path):
    """Add path, if it lies in the run directory, to the run's list of its files (before writing it)."""
    run_dir = _RUN["dir"]
    if run_dir is None or not writes_files():
        return
    try:
        rel = Path(path).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return
    if rel in _RUN["written"]:
        return
    try:
        with open(Path(run_dir) / WRITTEN, "a") as f:
            f.write(rel + "\n")
    except OSError as e:
        _cannot(f"write {Path(run_dir) / WRITTEN}", e)
    _RUN["written"].add(rel)


def _remove_written(run_dir, written):
    """Remove an earlier run's own files (its list) and the folders they leave empty; returns how many went."""
    removed = 0
    for rel in written:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            continue  # not a name this program records
        path = run_dir / rel
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed += 1
        for folder in path.parents:
            if folder == run_dir or run_dir not in folder.parents:
                break
            try:
                folder.rmdir()  # only when empty: a user's file keeps its folder
            except OSError:
                break
    return removed


def _claim(path):
    """Before the run's first write under its directory: replace the old run (--force) or remove
    the files it listed (a reused run), then write the pending files (args.json, the data's
    fingerprint), each listed in WRITTEN."""
    pending = _RUN["pending"]
    if pending is None:
        return
    run_dir = pending["dir"]
    try:
        Path(path).resolve().relative_to(run_dir.resolve())
    except ValueError:
        return
    _RUN["pending"] = None
    try:
        if pending["replace"]:
            # The directory itself, not a symbolic link naming it: the link stays and names the new one.
            real = run_dir.resolve()
            aside = real.with_name(f"{real.name}.replaced-{os.getpid()}")
            os.replace(real, aside)
            real.mkdir()
            old_lock = _RUN["locks"].pop(str(real))
            _lock(run_dir)
            shutil.rmtree(aside)
            os.close(old_lock)
        if pending["remove"]:
            removed = _remove_written(run_dir, pending["remove"])
            kept = sorted(p.name for p in _run_contents(run_dir))
            print(
                f"{run_dir}: removed the {removed} files of an earlier run that stopped before its first checkpoint"
                + (f"; kept {', '.join(kept)}" if kept else ""),
                flush=True,
            )
        if pending["new"]:
            (run_dir / WRITTEN).unlink(missing_ok=True)  # a new run lists its own files
        for name, data in pending["files"].items():
            _record_written(run_dir / name)
            _atomic_write(run_dir / name, data)
    except OSError as e:
        _cannot(f"write {e.filename or run_dir}", e)


@atexit.register
def _remove_unused_run_dirs():
    """A run directory this process created and never wrote to does not outlive it."""
    for run_dir in _RUN["created"]:
        try:
            if run_dir.is_dir() and not _run_contents(run_dir):
                for p in run_dir.iterdir():
                    p.unlink()
                run_dir.rmdir()
        except OSError:
            pass


def _excepthook(kind, value, tb):
    """One line, not a traceback, for Ctrl-C and for file-system errors on a named path."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
    elif issubclass(kind, OSError) and value.filename:
        print(f"error: {value.filename}: {value.strerror or value}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, value, tb)


# ---- The data's fingerprint: a resume refuses data other than the run's


DATA_FINGERPRINT = "data_fingerprint.json"


def data_fingerprint(data):
    """What identifies the data a run trained on: sizes, and hashes of the labels, the class names
    and an evenly spaced sample of 64 images per split (cheap, and any other data set differs)."""

    def sha(array):
        return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]

    def split(s):
        sample = np.linspace(0, len(s) - 1, num=min(len(s), 64)).astype(np.int64)
        return {
            "images": list(s.images.shape),
            "labels": sha(s.labels.numpy().astype("<i8")),
            "image_sample": sha(s.images[torch.from_numpy(sample)].numpy()),
        }

    names = sha(np.frombuffer(json.dumps(data.class_names).encode(), dtype=np.uint8))
    splits = {part: split(getattr(data, part)) for part in ("train", "test")}
    return {"dataset": data.name, "classes": data.num_classes, "class_names": names, **splits}


def _fingerprint_differences(recorded, current):
    """Names of the parts two data fingerprints disagree on: "dataset", "train labels", ..."""
    recorded = recorded if isinstance(recorded, dict) else {}
    differ = []
    for part in current:
        if isinstance(current[part], dict):
            old = recorded.get(part) if isinstance(recorded.get(part), dict) else {}
            differ += [f"{part} {key}" for key in current[part] if old.get(key) != current[part][key]]
        elif recorded.get(part) != current[part]:
            differ.append(part)
    return differ or ["their fingerprints"]


def _check_run_data(args, data):
    """In a run (the args setup was given): record the data's fingerprint; on --resume, refuse data
    other than the run's (another --data-dir) in one line. Runs from before fingerprints record one."""
    run_dir = _RUN["dir"]
    if run_dir is None or _RUN["args"] is not args:
        return
    fingerprint = _plain(data_fingerprint(data))
    path = Path(run_dir) / DATA_FINGERPRINT
    if getattr(args, "resume", None) and path.is_file():
        recorded = _read_run_json(run_dir, DATA_FINGERPRINT)
        if recorded != fingerprint:
            differ = _fingerprint_differences(recorded, fingerprint)
            fail(
                f"--resume {run_dir}: these are not the data the run trained on ({', '.join(differ)} differ); "
                f"give --data-dir {run_settings(read_run_args(run_dir)).get('data_dir')} or the same data"
            )
        return
    pending = _RUN["pending"]
    if pending is not None and pending["dir"] == run_dir:
        pending["files"][DATA_FINGERPRINT] = _json_bytes(fingerprint)  # written with args.json
    else:
        atomic_write_bytes(path, _json_bytes(fingerprint))


# ---- Files written atomically, JSON lines


def write_json(path, obj):
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write_bytes(path, _json_bytes(obj))


def _json_bytes(obj):
    return (json.dumps(obj, indent=2, default=_json_default) + "\n").encode()


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path, data):
    """Write through a temp file and a rename; the file gets the usual mode (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _will_write(path):
    """Before this process writes path: False on ranks > 0 of a ddp run (they write nothing); else
    the run takes its directory (_claim) and lists path among its files, and True."""
    if not writes_files():
        return False
    _claim(path)
    _record_written(path)
    return True


def atomic_write_bytes(path, data):
    """Write a file atomically: a reader sees the old file or the new one, never half of one.

    A file-system error (read-only, full disk) is one line naming the path. Ranks > 0 of a ddp
    run write nothing (rank 0 writes the run's files)."""
    if not _will_write(path):
        return
    try:
        _atomic_write(path, data)
    except OSError as e:
        _cannot(f"write {path}", e)


def write_text(path, text):
    """A text result file (tables, trees, summaries), written as write_json writes: atomically,
    one line on a file-system error, by rank 0 alone under ddp."""
    atomic_write_bytes(path, text.encode())


def append_jsonl(path, record):
    """Append one JSON line. A torn last line (a kill during an earlier append) is cut off first,
    so that this record does not get glued onto it."""
    if not _will_write(path):
        return
    line = (json.dumps(record, default=_json_default) + "\n").encode()
    try:
        with open(path, "a+b") as f:
            _cut_torn_line(f)
            f.write(line)
    except OSError as e:
        _cannot(f"write {path}", e)


def _cut_torn_line(f):
    """Truncate an open JSON-lines file after its last newline (a torn line is only half a record),
    or end a whole last record that lacks its newline."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(max(0, size - 65536))
    tail = f.read()
    if tail.endswith(b"\n"):
        return
    cut = tail.rfind(b"\n")
    if cut < 0 and len(tail) < size:  # a last line longer than the tail read: read it all
        f.seek(0)
        tail = f.read()
        cut = tail.rfind(b"\n")
    start = size - len(tail) + cut + 1
    f.seek(start)
    last = f.read()
    try:
        whole = isinstance(json.loads(last), dict)  # a record is an object; "12" of "123" is not one
    except ValueError:
        whole = False
    if whole:
        f.write(b"\n")
    else:
        f.truncate(start)


def read_jsonl(path):
    """The records of a JSON-lines file. A torn last line (a kill during the write) is left out;
    a damaged line elsewhere is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records, damaged = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # the last piece has no newline: a torn write, not damage
                damaged += 1
    if damaged:
        print(f"warning: {path}: skipped {damaged} damaged line(s)", file=sys.stderr, flush=True)
    return records


# ---- Checkpoints (weights_only) and RNG states


def save_checkpoint(path, state):
    """torch.save, atomically. Keep `state` to tensors and plain values: it is read back with
    weights_only=True."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, device="cpu"):
    """torch.load with weights_only=True: tensors and plain values only, never code from the file.
    A missing, truncated or foreign file is one line."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        fail(f"cannot load the checkpoint {path}: {_load_failure(e)}")


def _refused_as_unsafe(error):
    """True when torch.load(weights_only=True) refused a file for holding more than tensors and plain values."""
    return isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower()


def _load_failure(error):
    """Why torch.load(weights_only=True) refused a file, in our words. torch's own message advises
    turning the weights-only check off, the one unsafe step for a planted file: never quoted."""
    if _refused_as_unsafe(error):
        return (
            "it holds Python objects besides tensors and plain values, so this project did not write it (or it "
            "was altered) and loading it could run code; it is not loaded. Use a checkpoint.pt a run of these "
            "scripts wrote, or train again"
        )
    if isinstance(error, FileNotFoundError):
        return "no such file"
    return (
        f"not a readable PyTorch file ({_first_sentence(error)}): truncated or damaged, or another kind of file; "
        "use an intact checkpoint.pt of a run, or train again"
    )


def _first_sentence(error, limit=160):
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return text.split(". ")[0][:limit]


def _misfit(model, error):
    """One line for a checkpoint whose state does not fit the model (load_state_dict's many lines)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    if isinstance(error, KeyError):
        reason = f"no {error} in it"
    return (
        f"does not fit this {type(model).__name__} ({reason[:200]}); it was written with another architecture "
        "or other flags"
    )


def load_weights(model, state, path):
    """model.load_state_dict(state); weights that do not fit (another architecture) are one line."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        fail(f"{path}: {_misfit(model, e)}")


def get_rng_state(device):
    """Every generator's state as tensors and plain lists (weights_only-safe in a checkpoint)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, next_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": [version, list(internal), next_gauss],
    }


def set_rng_state(rng, device):
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, next_gauss = rng["python"]
    random.setstate((version, tuple(internal), next_gauss))


def _weights_only_safe(obj):
    """numpy values in a state dict as tensors and Python numbers (weights_only=True reads them)."""
    if isinstance(obj, dict):
        return {k: _weights_only_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_weights_only_safe(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _snapshot(obj):
    """A copy of a checkpoint's state that later training steps cannot change (tensors on the CPU)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.is_cuda else obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class CheckpointWriter:
    """fit's checkpoint, then its log line, written on a background thread while the next epoch
    trains (serialising and fsync-ing HierNet's 48 MB state takes about a quarter of a second).
    One write at a time and in order: the state is copied before training goes on, and the next
    write, the end of fit and an interruption each wait for the one in flight. A write's error is
    raised in the training thread at the next wait. The wait is on an Event the write sets as it
    ends, not on Thread.join: a join cut short by Ctrl-C can mark the running thread stopped
    (CPython 3.11), after which neither a second join nor the interpreter's exit waits for it."""

    def __init__(self):
        self.done, self.error = None, None

    def submit(self, path, state, log_path=None, records=()):
        """Write state to path, then append each of records (the epochs' log lines) to log_path."""
        self.wait()
        state = _snapshot(state)
        done = threading.Event()

        def write():
            try:
                save_checkpoint(path, state)
                for record in records if log_path is not None else ():
                    append_jsonl(log_path, record)
            except BaseException as e:  # SystemExit from fail() included: raised again by wait()
                self.error = e
            finally:
                done.set()

        self.done = done
        threading.Thread(target=write, name="checkpoint-writer").start()

    def wait(self):
        if self.done is not None:
            self.done.wait()  # a Ctrl-C here leaves self.done set: the next wait waits again
            self.done = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


# =============================================================================================
# 7. Several processes (torchrun): process groups, ddp and sweep modes, the DDP wrapper
# =============================================================================================


# Started by torchrun with WORLD_SIZE > 1, a script runs in one of two modes (--distributed):
# "ddp", one run over all the processes (DistributedDataParallel; each process sees 1/W of
# every global batch, so --batch-size is per GPU and the global batch is W x --batch-size), or
# "sweep", independent runs split over the processes (each its own share, no gradient traffic).
# A plain `python script.py` (no WORLD_SIZE, or 1) never touches torch.distributed.
_DIST = {"rank": 0, "world": 1, "local_rank": 0, "mode": None, "cpu_group": None}


def launched_distributed():
    """True when torchrun started this process as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device, mode="ddp"):
    """Join torchrun's process group; returns this process's device (on CUDA: process_gpu).

    Reads RANK, LOCAL_RANK and WORLD_SIZE from the environment torchrun sets. Backend: nccl for
    ddp on CUDA, gloo otherwise (on the CPU, and in sweep mode, where the group only carries a
    barrier and the run directory's path). The sweep group waits up to 7 days at a barrier: its
    shares of runs may end hours apart. Returns the device; rank() and world_size() give the rest."""
    if mode not in ("ddp", "sweep"):
        fail(f"--distributed {mode}: choose ddp or sweep")
    try:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    except (KeyError, ValueError):
        fail("WORLD_SIZE > 1 but RANK/LOCAL_RANK are not set: start several processes with torchrun")
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", process_gpu(local_rank, torch.cuda.device_count(), mode))
        torch.cuda.set_device(device)
    elif mode == "ddp" and device.type != "cpu":
        fail(f"--distributed ddp runs on CUDA or the CPU, not on {device.type}")
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" and mode == "ddp" else "gloo"
        timeout = datetime.timedelta(days=7) if mode == "sweep" else datetime.timedelta(minutes=30)
        torch.distributed.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        atexit.register(_end_distributed)
        # Host-side objects (the run directory's path) and barriers go through gloo.
        cpu_group = torch.distributed.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
        _DIST.update(cpu_group=cpu_group)
    _DIST.update(rank=rank, world=world, local_rank=local_rank, mode=mode)
    return device


def process_gpu(local_rank, gpus, mode):
    """The GPU of torchrun's process LOCAL_RANK: its own under ddp (one process per GPU); in a
    sweep, GPU local_rank mod gpus, so that more processes than GPUs share them (through MPS when
    its daemon runs: small networks leave most of a GPU idle)."""
    if mode == "sweep" and gpus > 0:
        return local_rank % gpus
    if local_rank >= gpus:
        fail(f"torchrun LOCAL_RANK {local_rank}: this machine has {gpus} CUDA device(s); ddp runs one process per GPU")
    return local_rank


def _end_distributed():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_distributed():
    """True after init_distributed (in either mode)."""
    return _DIST["mode"] is not None


def ddp_active():
    """True when this process is one of several sharing one run (--distributed ddp)."""
    return _DIST["mode"] == "ddp" and _DIST["world"] > 1


def rank():
    return _DIST["rank"]


def world_size():
    return _DIST["world"]


def writes_files():
    """Whether this process writes the run's files: always, except ranks > 0 of a ddp run."""
    return not ddp_active() or _DIST["rank"] == 0


def barrier():
    """Wait for every process of torchrun's group (a no-op in a plain process)."""
    if is_distributed():
        torch.distributed.barrier(group=_DIST["cpu_group"])


class DistributedModel(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel whose other attributes are the model's (model.centers, model.head).

    A loss_fn may read them, and use parameters after the forward pass, as long as it calls
    the wrapper itself (model(x)) once per step: that call is what arms the gradient
    all-reduce (make_train_step checks that it happened)."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def distributed_model(model):
    """The model wrapped in DistributedDataParallel (its gradients averaged over the processes).

    The parameters stay the model's own: optimizers, checkpoints and evaluation keep using the
    plain model. Buffers (batch-norm statistics) are rank 0's, broadcast at every forward; batch
    norm normalises with each rank's own batch (as usual with DDP, no SyncBatchNorm)."""
    device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
    return DistributedModel(model, device_ids=device_ids)


def model_device(model):
    return next(model.parameters()).device
