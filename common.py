"""Shared toolbox for the hierarchical-classification scripts.

Plain functions and nn.Modules, read top to bottom:

1. errors, flags, seeding, run directories, atomic files
2. data: CIFAR-100 / CIFAR-10 pickles, MNIST, image folders, the synthetic `shapes`
   dataset, class hierarchies, class-balanced splits
3. GpuLoader: the whole split as uint8 on the device, augmented there in batch
4. backbones: CIFAR ResNet (6n+2, ELU variant), pre-activation ResNet-164, DenseNet-BC,
   VGG with batch norm, ResNet-18 / PreAct ResNet-18, the MNIST LeNet
5. training: optimizers, schedules, one train step (bf16 autocast, channels_last, optional
   CUDA graph), `fit` with checkpoints and resume, `predict`, metrics

Every script imports this file; a script's method lives in the script.
"""

import argparse
import datetime
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# 1. Errors, flags, seeding, run directories
# ---------------------------------------------------------------------------------------


def fail(message):
    """Stop with one clear line on stderr and exit status 1 (no traceback)."""
    raise SystemExit(f"error: {message}")


DATASETS = ("shapes", "cifar100", "cifar10", "mnist", "folder")


def add_common_args(parser, *, epochs, batch_size, lr, dataset="shapes", datasets=DATASETS):
    """The flags every script shares; the defaults passed in are the script's paper settings."""
    g = parser.add_argument_group("common")
    g.add_argument("--dataset", default=dataset, choices=datasets)
    g.add_argument("--data-dir", default="./data", help="root of the on-disk datasets")
    g.add_argument("--hierarchy", default=None, help="JSON {coarse: [fine, ...]} (nested for more levels)")
    g.add_argument("--image-size", type=int, default=None, help="shapes/folder image side (shapes default 64)")
    g.add_argument("--train-size", type=int, default=20000, help="shapes: number of training images")
    g.add_argument("--test-size", type=int, default=6000, help="shapes: number of test images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="autocast dtype on CUDA (CPU: fp32)")
    g.add_argument("--out-dir", default=None, help="run directory (default runs/<script>-<time>)")
    g.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR where it stopped")
    g.add_argument("--force", action="store_true", help="overwrite an existing --out-dir")
    g.add_argument("--dry-run", action="store_true", help="one epoch of two batches per stage")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (no CUDA graph)")
    g.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="capture the whole train step in one CUDA graph",
    )
    return parser


def parse_args(parser, argv=None):
    """Parse argv; with --resume DIR, the run's saved args.json fills every flag not given."""
    args = parser.parse_args(argv)
    if args.resume:
        saved = Path(args.resume) / "args.json"
        if not saved.is_file():
            fail(f"--resume {args.resume}: no args.json there; not a run directory")
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in json.loads(saved.read_text()).items() if k in known})
        args = parser.parse_args(argv)
    return args


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
    return device


def setup(args, script):
    """Seed, pick the device, make (or reopen) the run directory and save args.json.

    Returns (run_dir, device). A run directory that exists and is not empty is only reused
    with --resume (continue) or --force (start over)."""
    if args.dry_run:
        args.epochs = 1
    seed_everything(args.seed)
    device = get_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.resume:
        run_dir = Path(args.resume)
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out_dir or f"runs/{script}-{stamp}")
        if run_dir.exists() and any(run_dir.iterdir()):
            if not args.force:
                fail(
                    f"{run_dir} exists and is not empty; pass --resume {run_dir} to continue it or --force to overwrite"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "args.json", vars(args))
    return run_dir, device


def write_json(path, obj):
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path, state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path, device="cpu"):
    return torch.load(path, map_location=device, weights_only=False)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_json_default) + "\n")


def read_jsonl(path):
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_seconds(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


# ---------------------------------------------------------------------------------------
# 2. Data
# ---------------------------------------------------------------------------------------


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


def hierarchy_from_json(obj, fine_names, source="hierarchy"):
    """Parse {coarse: [fine, ...]} or nested {top: {mid: [fine, ...]}} into a Hierarchy.

    Every fine class must appear exactly once, all leaves at the same depth."""
    fine_index = {n: i for i, n in enumerate(fine_names)}
    paths = {}  # fine name -> list of ancestor names, top first

    def walk(node, trail):
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
    except json.JSONDecodeError as e:
        fail(f"--hierarchy {path}: not valid JSON ({e})")
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


def _unpickle(path):
    with open(path, "rb") as f:
        obj = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


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
    meta = _unpickle(base / "meta")
    splits, coarse = {}, {}
    for part in ("train", "test"):
        d = _unpickle(base / part)
        images = torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
        splits[part] = Split(images, torch.as_tensor(np.asarray(d["fine_labels"]), dtype=torch.long))
        coarse[part] = np.asarray(d["coarse_labels"])
    fine_names, coarse_names = _names(meta["fine_label_names"]), _names(meta["coarse_label_names"])
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
    names = _names(_unpickle(base / "batches.meta")["label_names"])
    splits = {}
    for part, files in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        images, labels = [], []
        for name in files:
            if not (base / name).exists():
                fail(f"{base / name} not found; the cifar-10-batches-py folder is incomplete")
            d = _unpickle(base / name)
            images.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(d["labels"]))
        splits[part] = Split(
            torch.from_numpy(np.concatenate(images)), torch.as_tensor(np.concatenate(labels), dtype=torch.long)
        )
    hierarchy = hierarchy_from_json(CIFAR10_HIERARCHY, names, source="built-in CIFAR-10 hierarchy")
    return splits["train"], splits["test"], hierarchy


def load_mnist(data_dir):
    """MNIST through torchvision's on-disk format (MNIST/raw/*-ubyte)."""
    import torchvision

    root = Path(data_dir)
    _need(root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", "mnist", root, "MNIST")
    splits = {}
    for part in ("train", "test"):
        try:
            ds = torchvision.datasets.MNIST(root, train=part == "train", download=False)
        except RuntimeError as e:
            fail(f"MNIST under {root}: {e}")
        splits[part] = Split(ds.data.unsqueeze(1).contiguous(), ds.targets.long())
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
        files[part] = [
            (c.name, p)
            for c in sorted(part_dir.iterdir())
            if c.is_dir()
            for p in sorted(c.iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files[part]:
            fail(f"image folder {part_dir} holds no images")
    return files


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
    key = hashlib.sha1(repr(image_size).encode())
    for part in ("train", "test"):
        for c, p in files[part]:
            st = p.stat()
            key.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cache = root / f".cache-{image_size or 'native'}-{key.hexdigest()[:16]}.pt"
    if cache.exists():
        obj = torch.load(cache, weights_only=False)
    else:
        for old in root.glob(f".cache-{image_size or 'native'}-*.pt"):
            old.unlink()
        index = {c: i for i, c in enumerate(class_names)}
        obj = {"class_names": class_names}
        for part in ("train", "test"):
            images = []
            for c, p in files[part]:
                try:
                    with Image.open(p) as im:
                        img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
                except Exception as e:
                    fail(f"cannot decode image {p}: {e}")
                if image_size and tuple(img.shape[1:]) != (image_size, image_size):
                    img = torchvision.transforms.functional.resize(img, [image_size, image_size], antialias=True)
                images.append(img)
            shapes = {tuple(i.shape) for i in images}
            if len(shapes) > 1:
                fail(f"{root}/{part}: images differ in size {sorted(shapes)[:3]}...; pass --image-size to resize them")
            obj[part] = (torch.stack(images), torch.tensor([index[c] for c, _ in files[part]]))
        torch.save(obj, cache)
    train, test = (Split(*obj[part]) for part in ("train", "test"))
    return train, test, Hierarchy(["fine"], [obj["class_names"]], [np.arange(len(obj["class_names"]))])


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


def load_shapes(n_train=20000, n_test=6000, image_size=64, seed=0):
    """The synthetic hierarchical dataset; train and test drawn from disjoint seeds."""
    splits = []
    for n, offset in ((n_train, 0), (n_test, 1)):
        images, labels = make_shapes(n, image_size, seed=seed * 2 + offset + 12345)
        extra = {k: v for k, v in labels.items() if k != "fine"}
        splits.append(Split(images, labels["fine"], extra))
    return splits[0], splits[1], shapes_hierarchy()


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
    return Data(name, train, test, hierarchy, mean, std)


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


def split_half(labels, seed):
    """HierNet's split of a test set: half of every class for validation, half for test."""
    counts = np.bincount(np.asarray(labels))
    return stratified_split(labels, int(counts[counts > 0].min()) // 2, seed)


# ---------------------------------------------------------------------------------------
# 3. The GPU-resident loader
# ---------------------------------------------------------------------------------------


class GpuLoader:
    """Batches from a split held whole on the device as uint8.

    Augmentation happens on the device, in batch: a random translation by up to `crop_pad`
    pixels (pad, then crop; the border filled with `fill`, a 0..255 grey level), a random
    horizontal flip, then normalisation. A fresh permutation per epoch comes from the loader's
    own generator, so nothing in an epoch waits for the host. `labels` is a tensor or a tuple of
    tensors; batches are (images, labels) in the same structure."""

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
    ):
        self.device = torch.device(device)
        self.images = images.to(self.device)
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
        if self.drop_last and n < batch_size:
            fail(f"a training split of {n} images is smaller than one batch of {batch_size}")

    def __len__(self):
        n = len(self.images)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"].cpu())  # a checkpoint mapped to the GPU holds it there

    def augment(self, x):
        """uint8 B x C x H x W -> normalised float32 (channels_last when asked)."""
        B, C, H, W = x.shape
        if self.train and (self.crop_pad or self.flip):
            p = self.crop_pad
            ar_h = torch.arange(H, device=self.device)
            ar_w = torch.arange(W, device=self.device)
            oy = torch.randint(0, 2 * p + 1, (B, 1), device=self.device, generator=self.generator)
            ox = torch.randint(0, 2 * p + 1, (B, 1), device=self.device, generator=self.generator)
            cols = ox + ar_w
            if self.flip:
                flipped = torch.rand(B, 1, device=self.device, generator=self.generator) < 0.5
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
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.augment(self.images[idx])
            ys = tuple(l[idx] for l in self.labels)
            yield x, (ys[0] if self.single else ys)


# ---------------------------------------------------------------------------------------
# 4. Backbones
# ---------------------------------------------------------------------------------------
# Every backbone has `stem`, `stages` (an nn.ModuleList), `head` (pool + flatten + fc) and
# `features(x)` (the pooled vector before the classifier), so a script can cut the network at
# a stage or a block.


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


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


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 + shortcut (He et al., identity mappings)."""

    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * 4
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(width), conv3x3(width, width, stride)
        self.bn3, self.conv3 = nn.BatchNorm2d(width), nn.Conv2d(width, cout, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride > 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


class PreActResNetCifar(Backbone):
    """Pre-activation bottleneck ResNet for CIFAR, depth 9n+2 (164: n=18; 1.7M parameters)."""

    def __init__(self, depth=164, num_classes=10):
        super().__init__()
        if (depth - 2) % 9:
            fail(f"pre-activation bottleneck ResNet depth must be 9n+2, got {depth}")
        n = (depth - 2) // 9
        self.stem = conv3x3(3, 16)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(PreActBottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * 4
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = Head(cin, num_classes, pre=nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU()))
        init_weights(self)


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k) - BN-ReLU-conv3x3 (k), concatenated to the input."""

    def __init__(self, cin, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(),
            conv3x3(4 * growth, growth),
        )

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNetBC(Backbone):
    """DenseNet-BC (Huang et al.) for CIFAR: depth 100, growth 12, compression 0.5 (0.8M)."""

    def __init__(self, depth=100, growth=12, num_classes=10, compression=0.5):
        super().__init__()
        n = (depth - 4) // 6
        c = 2 * growth
        self.stem = conv3x3(3, c)
        stages = []
        for i in range(3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < 2:  # transition: BN-ReLU-conv1x1-avgpool
                out = int(math.floor(c * compression))
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = Head(c, num_classes, pre=nn.Sequential(nn.BatchNorm2d(c), nn.ReLU()))
        init_weights(self)


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


class BasicBlock(nn.Module):
    """ResNet-18's block with a 1x1 projection shortcut when the shape changes (option B)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv + shortcut (He et al., identity mappings)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), conv3x3(cout, cout)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride > 1 or cin != cout) else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class ResNet18(Backbone):
    """ResNet-18: 4 stages of 2 blocks, 64-128-256-512, adaptive average pooling.

    stem='imagenet' is the 7x7 stride-2 convolution, BN, ReLU and 3x3 stride-2 max-pool (the
    HDL paper's); stem='cifar' is one 3x3 stride-1 convolution. preact=True uses
    pre-activation blocks (PreAct ResNet-18)."""

    def __init__(self, num_classes=10, stem="imagenet", preact=False, in_channels=3):
        super().__init__()
        if stem == "imagenet":
            layers = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)]
            if not preact:
                layers += [nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
            self.stem = nn.Sequential(*layers, nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            layers = [conv3x3(in_channels, 64)]
            self.stem = (
                nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            )
        else:
            fail(f"ResNet-18 stem must be 'imagenet' or 'cifar', got {stem!r}")
        block = PreActBlock if preact else BasicBlock
        stages, cin = [], 64
        for i, width in enumerate((64, 128, 256, 512)):
            stages.append(nn.Sequential(block(cin, width, 1 if i == 0 else 2), block(width, width)))
            cin = width
        self.stages = nn.ModuleList(stages)
        pre = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU()) if preact else None
        self.head = Head(512, num_classes, pre=pre)
        init_weights(self)


class LeNetMNIST(Backbone):
    """The MNIST network of the latent-string paper: conv 16 - pool - conv 32 - pool - conv 64,
    flattened to 64 x 7 x 7 = 3136 features, then FC 3136-500-10."""

    def __init__(self, num_classes=10, hidden=500, in_channels=1):
        super().__init__()
        self.stem = nn.Identity()
        self.stages = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(in_channels, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2)),
                nn.Sequential(nn.Conv2d(32, 64, 5, padding=2), nn.ReLU()),
            ]
        )
        self.head = FlattenHead(64 * 7 * 7, num_classes, hidden)
        init_weights(self)


class FlattenHead(nn.Module):
    """Flatten (no pooling), then FC hidden-ReLU-FC."""

    def __init__(self, cin, num_classes, hidden):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, num_classes)

    def pool(self, x):
        return torch.flatten(x, 1)

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


# ---------------------------------------------------------------------------------------
# 5. Training and metrics
# ---------------------------------------------------------------------------------------


def make_sgd(params, lr, momentum=0.9, weight_decay=1e-4, nesterov=False):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def make_adam(params, lr, weight_decay=0.0, device="cpu"):
    # capturable keeps Adam's step counter on the device, which a CUDA graph needs.
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, capturable=torch.device(device).type == "cuda")


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


class ReduceOnPlateau:
    """lr times `factor` when the monitored validation loss has not decreased for `patience`
    consecutive checks. Plain state so it checkpoints with the run."""

    def __init__(self, lr, factor=0.3, patience=5, min_lr=0.0):
        self.lr, self.factor, self.patience, self.min_lr = lr, factor, patience, min_lr
        self.best, self.bad = float("inf"), 0

    def update(self, value):
        if value < self.best:
            self.best, self.bad = value, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                self.lr, self.bad = max(self.lr * self.factor, self.min_lr), 0
        return self.lr

    def __call__(self, step):
        return self.lr

    def state_dict(self):
        return {"lr": self.lr, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.lr, self.best, self.bad = state["lr"], state["best"], state["bad"]


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


def make_train_step(model, loss_fn, optimizer, *, device, dtype="bf16", cuda_graph=True):
    """One optimisation step: step(x, y) -> dict of 0-dim device tensors (no host sync).

    loss_fn(model, x, y) returns the loss, or (loss, {name: 0-dim tensor}) for more statistics
    (sums or means over the batch). On CUDA with cuda_graph, forward, backward and optimizer
    step are captured once into one CUDA graph and replayed; the graph is captured again when
    the learning rate changes (it is baked into the graph). The returned tensors are reused by
    the next call: accumulate them before calling again."""
    device = torch.device(device)

    def eager(x, y):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss, stats = _as_stats(loss_fn(model, x, y))
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
                    loss, stats = _as_stats(loss_fn(model, state["x"], state["y"]))
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
    """Train `epochs` epochs with a checkpoint after each; continue from stage_dir/checkpoint.pt.

    evaluate(epoch) -> dict of metrics (validation only); on_epoch_end(epoch, record) may change
    state (e.g. a plateau schedule, class centres); extra_state maps names to objects with
    state_dict()/load_state_dict() saved in the checkpoint. Every epoch appends one line to
    log_path (metrics.jsonl) and prints one progress line with ETA. A non-finite loss stops the
    run with an error; the last good checkpoint stays. Returns the list of epoch records."""
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = stage_dir / "checkpoint.pt"
    extra_state = extra_state or {}
    device = next(model.parameters()).device
    epoch, global_step, history = 0, 0, []
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        loader.load_state_dict(ckpt["loader"])
        for name, obj in extra_state.items():
            obj.load_state_dict(ckpt["extra"][name])
        epoch, global_step, history = ckpt["epoch"], ckpt["step"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if epoch < epochs:
            print(f"[{stage}] resuming from {ckpt_path} at epoch {epoch}/{epochs}", flush=True)
    started = time.time()
    first_epoch = epoch
    while epoch < epochs:
        model.train()
        t0 = time.time()
        sums, images, global_step = train_epoch(step, loader, optimizer, lr_at, global_step)
        means = {k: v.item() / len(loader) for k, v in sums.items() if k != "correct"}  # one sync per epoch
        if "correct" in sums:
            means["train_acc"] = 100.0 * sums["correct"].item() / max(images, 1)
        if not all(math.isfinite(v) for v in means.values()):
            fail(f"[{stage}] non-finite loss in epoch {epoch + 1} ({means}); the last good checkpoint is {ckpt_path}")
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
        rng = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        }
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "loader": loader.state_dict(),
                "extra": {k: v.state_dict() for k, v in extra_state.items()},
                "epoch": epoch,
                "step": global_step,
                "history": history,
                "rng": rng,
            },
        )
        if log_path is not None:
            append_jsonl(log_path, record)
        elapsed = time.time() - started
        eta = elapsed / (epoch - first_epoch) * (epochs - epoch)
        shown = " ".join(
            f"{k} {v:.4g}"
            for k, v in record.items()
            if k not in ("stage", "epoch", "step", "seconds") and isinstance(v, (int, float))
        )
        print(f"[{stage}] epoch {epoch}/{epochs} {shown} | {seconds:.1f}s ETA {format_seconds(eta)}", flush=True)
    model.eval()
    return history


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


def accuracy(scores, labels):
    """Top-1 accuracy in percent."""
    return 100.0 * (scores.argmax(1) == labels).float().mean().item()


def topk_accuracy(scores, labels, k=5):
    k = min(k, scores.shape[1])
    return 100.0 * (scores.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item()


def confusion_matrix(pred, labels, num_classes):
    """counts[true, predicted]."""
    idx = labels.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


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

    scores: N x C logits or log-probabilities (argmax and top-k do not care; the level
    accuracies soft-max them, as `level_accuracies` does, so pass log-probabilities rather than
    probabilities). labels: N fine labels. level_preds: optional {level name: N labels predicted
    at that level by the model's own level heads}.

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
    scores = torch.as_tensor(scores).float()
    labels = torch.as_tensor(labels).long().reshape(-1)
    n_classes = hierarchy.num_classes()
    if scores.ndim != 2 or scores.shape[1] != n_classes:
        fail(f"hierarchical_metrics: scores of shape {tuple(scores.shape)}, expected N x {n_classes}")
    if len(labels) != len(scores) or len(labels) == 0:
        fail(f"hierarchical_metrics: {len(labels)} labels for {len(scores)} score rows (need as many, at least one)")
    heights = lca_heights(hierarchy).float()
    pred = scores.argmax(1)
    top = scores.topk(min(5, n_classes), 1).indices
    mistakes = pred != labels
    overlap = shared_ancestors(hierarchy)[pred, labels].sum().item()
    set_size = hierarchy.n_levels * len(labels)  # every class's ancestor set has n_levels members
    hprecision = 100.0 * overlap / set_size  # summed |pred set|
    hrecall = 100.0 * overlap / set_size  # summed |true set|
    result = {
        "top1": accuracy(scores, labels),
        "top5": topk_accuracy(scores, labels, 5),
        "level_acc": level_accuracies(scores, labels, hierarchy),
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
            level_pred = torch.as_tensor(level_pred).long().reshape(-1)
            if len(level_pred) != len(labels):
                fail(f"hierarchical_metrics: {len(level_pred)} '{name}' predictions for {len(labels)} images")
            agree &= level_pred == hierarchy.labels(name, pred)
        result["consistency"] = 100.0 * agree.float().mean().item()
    return result


def format_hierarchical_metrics(m):
    """One line for logs: top-1/5, level accuracies, severity, hdist@k, hP/hR/hF, consistency."""
    levels = " ".join(f"{name} {acc:.2f}" for name, acc in m["level_acc"].items())
    severity = "-" if m["mistake_severity"] is None else f"{m['mistake_severity']:.3f}"
    line = (
        f"top1 {m['top1']:.2f} top5 {m['top5']:.2f} | levels {levels} | severity {severity}"
        f" hdist@1 {m['hdist@1']:.3f} hdist@5 {m['hdist@5']:.3f}"
        f" | hP {m['hprecision']:.2f} hR {m['hrecall']:.2f} hF1 {m['hf1']:.2f}"
    )
    if "consistency" in m:
        line += f" | consistency {m['consistency']:.2f}"
    return line


@torch.no_grad()
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


def to_device_model(model, device):
    """Move a model to the device, channels_last on CUDA."""
    model = model.to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
