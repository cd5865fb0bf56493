"""CIFAR-100's two WebP parts (and, if asked, CIFAR-10's JPEG copy) cut into pieces that travel to the GPU
machine beside the checkout.

A device call carries at most 64 MiB, the checkout's tracked files included. One CIFAR-100 part
(../shared/data/cifar100_webp_a.npz, 50.8 MiB) beside a checkout of 14 MiB leaves little room, and
every landed run makes the checkout larger. So the parts go as equal pieces (three of 33.7 MiB by
default; 39.5 MiB with --with-cifar10's 17.5 MiB more), one per call, and are joined and checked on the
GPU machine. split also copies the small companions (the official order, the unpack scripts) to dst:

    python tools/device_data.py split ../shared/data data --with-cifar10   # here: data/cifar100_piece{0,1,2}.bin,
                                                                          # data/cifar100_pieces.json, companions
    call 1, carry data/cifar100_piece0.bin data/cifar100_pieces.json data/cifar100_official_order.npz
        data/unpack_cifar100.py data/unpack_cifar10_jpeg.py:
        mkdir -p /root/data && cp data/cifar100_* data/unpack_* /root/data/
    call 2, carry data/cifar100_piece1.bin:  cp data/cifar100_piece1.bin /root/data/
    call 3, carry data/cifar100_piece2.bin:  cp data/cifar100_piece2.bin /root/data/ &&
        python3 tools/device_data.py join /root/data &&
        python3 /root/data/unpack_cifar100.py /root/data --parts /root/data && <the queue>
    (the queue, given --data-root /root/data, unpacks /root/data/cifar10_jpeg.npz there and links it into data/)

Make the calls one after another (the machine stays warm about 30 s). `join` checks every piece's
and every part's SHA-256 against the manifest and names a missing or damaged piece in one line.

A lease end to end (the commands of the calls; M minutes of device time left once the data is in):

    here:  python tools/gpu_runs.py --left --plan M --parallel K --only NAME ...   # choose the jobs
    call 1 also copies the checkout out of the way of later calls:
        rm -rf /root/code && mkdir -p /root/code && cp -r $(ls -A | grep -v '^data$') /root/code/
    call 3 ends with the queue, in its own session so that it outlives the call, then waits:
        cd /root/code && (setsid nohup python3 tools/gpu_runs.py --commit <HEAD, clean> --runs-dir /root/runs
        --data-root /root/data --parallel K --budget <SECONDS, about 60 M - 90> --out /root/pack --only NAME ...
        > /root/queue.log 2>&1 < /dev/null &); sleep 540; tail /root/queue.log
        (a run that cannot stop and go on later and may not fit, such as HDL's 800 epochs: name it first
        with --try NAME --alone NAME; it has the GPU alone until its ETA shows it cannot end in time)
    calls 4...: sleep and look (the machine goes back 30 s after a call ends, the queue with it)
    last call: wait for the queue to exit (it packs /root/pack/results.tar.gz at its deadline), cp /root/pack/* $OUT
    here:  tar xzf results.tar.gz -C /tmp/X; python tools/gpu_runs.py --collect /tmp/X; python tools/plots.py;
           python tools/results_table.py --write README.md
"""

import argparse
import hashlib
import json
import sys
from pathlib import Path

PARTS = ("cifar100_webp_a.npz", "cifar100_webp_b.npz")
CIFAR10 = "cifar10_jpeg.npz"  # with --with-cifar10, a third part: the pieces then carry CIFAR-10 too
# Small files of ../shared/data that the GPU machine needs beside the parts; split copies them to dst.
COMPANIONS = ("cifar100_official_order.npz", "unpack_cifar100.py", "unpack_cifar10_jpeg.py")
MANIFEST = "cifar100_pieces.json"


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def write(path, data):
    """Write bytes or text; a folder that cannot take it is one line, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            path.write_bytes(data)
        else:
            path.write_text(data)
    except OSError as e:
        sys.exit(f"device_data: cannot write {path}: {e.strerror or e}")


def split(src, dst, pieces, with_cifar10=False):
    """The parts in src (CIFAR-100's two, and CIFAR-10's JPEG copy if asked), concatenated and cut into
    `pieces` equal pieces in dst, with a manifest, the companions copied beside them; returns its path."""
    names = (*PARTS, CIFAR10) if with_cifar10 else PARTS
    parts = []
    for name in names:
        path = Path(src) / name
        if not path.is_file():
            sys.exit(f"device_data: {path} not found; the data sets' parts are in ../shared/data")
        parts.append(path.read_bytes())
    for name in COMPANIONS:
        if (Path(src) / name).is_file():
            write(Path(dst) / name, (Path(src) / name).read_bytes())
    blob = b"".join(parts)
    size = -(-len(blob) // pieces)
    dst = Path(dst)
    manifest = {
        "parts": [{"name": n, "bytes": len(p), "sha256": sha256(p)} for n, p in zip(names, parts)],
        "pieces": [],
    }
    for i in range(pieces):
        piece = blob[i * size : (i + 1) * size]
        write(dst / f"cifar100_piece{i}.bin", piece)
        manifest["pieces"].append({"name": f"cifar100_piece{i}.bin", "bytes": len(piece), "sha256": sha256(piece)})
    write(dst / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return dst / MANIFEST


def join(folder):
    """The pieces in folder joined back into the two parts, every piece and part checked."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        sys.exit(f"device_data: {folder / MANIFEST} not found; carry it with the first piece")
    manifest = json.loads((folder / MANIFEST).read_text())
    chunks = []
    for piece in manifest["pieces"]:
        path = folder / piece["name"]
        if not path.is_file():
            sys.exit(f"device_data: {path} not found; carry it in its own call")
        data = path.read_bytes()
        if sha256(data) != piece["sha256"]:
            sys.exit(f"device_data: {path} is damaged (SHA-256 differs); carry it again")
        chunks.append(data)
    blob, start = b"".join(chunks), 0
    for part in manifest["parts"]:
        data = blob[start : start + part["bytes"]]
        if sha256(data) != part["sha256"]:
            sys.exit(f"device_data: joined {part['name']} does not match its SHA-256; split the parts again")
        write(folder / part["name"], data)
        start += part["bytes"]
    return [folder / part["name"] for part in manifest["parts"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="here: the parts into pieces and a manifest")
    s.add_argument("src", help="folder with cifar100_webp_a.npz and cifar100_webp_b.npz")
    s.add_argument("dst", help="folder for the pieces (git-ignored, e.g. data)")
    s.add_argument("--pieces", type=int, default=3, help="pieces, one per device call")
    s.add_argument("--with-cifar10", action="store_true", help=f"also {CIFAR10}, spread over the same pieces")
    j = sub.add_parser("join", help="on the GPU machine: the pieces back into the parts, checked")
    j.add_argument("folder", help="where the pieces and the manifest were copied (e.g. /root/data)")
    a = p.parse_args(argv)
    if a.command == "split":
        if a.pieces < 1:
            p.error(f"--pieces must be at least 1, got {a.pieces}")
        print(split(a.src, a.dst, a.pieces, a.with_cifar10))
    else:
        for path in join(a.folder):
            print(path)


if __name__ == "__main__":
    main()
