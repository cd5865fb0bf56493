"""CIFAR-100's two WebP parts (and, if asked, CIFAR-10's JPEG copy) cut into pieces that travel to the GPU
machine beside the checkout.

A device call carries at most 64 MiB, the checkout's travelling files included (tracked ones and untracked
ones git does not ignore). One CIFAR-100 part (../shared/data/cifar100_webp_a.npz, 50.8 MiB) beside a
checkout of 16 MiB leaves little room, and every landed run or parked stage makes the checkout larger. So
the parts go as equal pieces, one per call, and are joined and checked on the GPU machine. split counts
the checkout and cuts the fewest pieces of which each fits one call beside it (three today; --pieces N
asks for N and is refused if a piece would not fit), and prints the count. It also copies the small
companions (the official order, the unpack scripts) to dst:

    python tools/device_data.py split ../shared/data data --with-cifar10   # here: data/cifar100_piece{0..P-1}.bin,
                                                                          # data/cifar100_pieces.json, companions
    call 1, carry data/cifar100_piece0.bin data/cifar100_pieces.json data/cifar100_official_order.npz
        data/unpack_cifar100.py data/unpack_cifar10_jpeg.py:
        mkdir -p /root/data && cp data/cifar100_* data/unpack_* /root/data/
    calls 2 .. P-1, carry data/cifar100_piece<k>.bin:  cp data/cifar100_piece<k>.bin /root/data/
    call P, carry the last piece:  cp data/cifar100_piece<P-1>.bin /root/data/ &&
        python3 tools/device_data.py join /root/data &&
        python3 /root/data/unpack_cifar100.py /root/data --parts /root/data && <the queue>
    (the queue, given --data-root /root/data, unpacks /root/data/cifar10_jpeg.npz there and links it into data/)

Make the calls one after another (the machine stays warm about 30 s). `join` checks every piece's
and every part's SHA-256 against the manifest and names a missing or damaged piece in one line.

A lease end to end (the commands of the calls; M minutes of device time left once the data is in):

    here:  python tools/gpu_runs.py --left --plan M --parallel K --only NAME ...   # choose the jobs
    call 1 also copies the checkout out of the way of later calls:
        rm -rf /root/code && mkdir -p /root/code && cp -r $(ls -A | grep -v '^data$') /root/code/
        (a GPU job that needs no data, such as a bench.py measurement with --commit <HEAD, clean> so that its
        file names the code, can start here in the background,
        setsid nohup like the queue below, and use the GPU while the pieces travel; call P waits for it
        with pgrep before it starts the queue, so that neither times the other's kernels; the GPU tests
        that CI skips, python3 -m pytest -q tests/test_cuda_graph.py > $OUT/gpu_tests.log, take about a
        minute in the foreground of call 1)
    call P ends with the queue, in its own session so that it outlives the call, then waits:
        cd /root/code && (setsid nohup python3 tools/gpu_runs.py --commit <HEAD, clean> --runs-dir /root/runs
        --data-root /root/data --parallel K --budget <SECONDS, about 60 M - 90> --out /root/pack --only NAME ...
        > /root/queue.log 2>&1 < /dev/null &); sleep 540; tail /root/queue.log
        (a run that cannot stop and go on later and may not fit, such as HDL's 800 epochs: name it first
        with --try NAME --alone NAME; it has the GPU alone until its ETA shows it cannot end in time)
    calls P+1...: sleep and look (the machine goes back 30 s after a call ends, the queue with it)
    last call: wait for the queue to exit (it packs /root/pack/results.tar.gz at its deadline), cp /root/pack/* $OUT:
        while pgrep -f '[g]pu_runs.py --commit' >/dev/null; do sleep 2; done; cp /root/pack/* $OUT/
        (the brackets keep pgrep from finding the call's own command line, which names gpu_runs.py too)
    here:  tar xzf results.tar.gz -C /tmp/X; python tools/gpu_runs.py --collect /tmp/X; python tools/plots.py;
           python tools/results_table.py --write README.md
"""

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

PARTS = ("cifar100_webp_a.npz", "cifar100_webp_b.npz")
CIFAR10 = "cifar10_jpeg.npz"  # with --with-cifar10, a third part: the pieces then carry CIFAR-10 too
# Small files of ../shared/data that the GPU machine needs beside the parts; split copies them to dst.
COMPANIONS = ("cifar100_official_order.npz", "unpack_cifar100.py", "unpack_cifar10_jpeg.py")
MANIFEST = "cifar100_pieces.json"
ROOT = Path(__file__).resolve().parent.parent
CALL_BYTES = 64 * 2**20  # what one device call carries, the checkout included
SPARE_BYTES = 2 * 2**20  # room for files the checkout gains between split and the lease (a commit, a log)
MANIFEST_BYTES = 64 * 2**10  # room kept for the manifest in the first call (it is about 1 KiB)
MOST_PIECES = 8  # each call costs device time (a start-up of seconds): more pieces than this, shrink the checkout


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


def travelling_bytes(root=ROOT):
    """Bytes of the checkout that travel with every device call: its tracked files and the untracked ones git
    does not ignore (as the device tool copies them); None outside a git checkout."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root, capture_output=True
        )
    except OSError:  # no git here
        return None
    if listed.returncode != 0:
        return None
    paths = {root / name for name in listed.stdout.decode().split("\0") if name}
    return sum(path.stat().st_size for path in paths if path.is_file())


def pieces_needed(data_bytes, checkout_bytes, companion_bytes):
    """The fewest equal pieces of data_bytes of which each travels in one call beside the checkout (the first
    call carries the companions and the manifest too); exits in one line when that takes more than MOST_PIECES
    calls."""
    room = CALL_BYTES - SPARE_BYTES - checkout_bytes - companion_bytes - MANIFEST_BYTES
    pieces = -(-data_bytes // room) if room > 0 else None
    if pieces is None or pieces > MOST_PIECES:
        sys.exit(
            f"device_data: the checkout's {checkout_bytes / 2**20:.1f} MiB leave too little room in a device call "
            f"of {CALL_BYTES / 2**20:.0f} MiB for the data in {MOST_PIECES} calls or fewer; land or drop large files "
            "(results/parked?) first"
        )
    return max(1, pieces)


def split(src, dst, pieces=None, with_cifar10=False, checkout_bytes=None):
    """The parts in src (CIFAR-100's two, and CIFAR-10's JPEG copy if asked), concatenated and cut into equal
    pieces in dst, with a manifest, the companions copied beside them; returns the manifest's path. pieces None:
    the fewest that each fit a device call beside the checkout (checkout_bytes, default: this checkout's
    travelling files); a count whose pieces would not fit is refused in one line."""
    names = (*PARTS, CIFAR10) if with_cifar10 else PARTS
    parts = []
    for name in names:
        path = Path(src) / name
        if not path.is_file():
            sys.exit(f"device_data: {path} not found; the data sets' parts are in ../shared/data")
        parts.append(path.read_bytes())
    companions = [Path(src) / name for name in COMPANIONS if (Path(src) / name).is_file()]
    blob = b"".join(parts)
    checkout_bytes = travelling_bytes() if checkout_bytes is None else checkout_bytes
    if checkout_bytes is None:
        sys.exit(f"device_data: cannot count the files that travel with a device call ({ROOT} is not a git checkout)")
    fewest = pieces_needed(len(blob), checkout_bytes, sum(path.stat().st_size for path in companions))
    if pieces is None:
        pieces = fewest
    elif pieces < fewest:
        sys.exit(
            f"device_data: {pieces} pieces of {len(blob) / pieces / 2**20:.1f} MiB do not fit a device call beside "
            f"the checkout's {checkout_bytes / 2**20:.1f} MiB; pass --pieces {fewest} or more, or leave it out"
        )
    for path in companions:
        write(Path(dst) / path.name, path.read_bytes())
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
    s.add_argument("--pieces", type=int, help="pieces, one per device call (default: the fewest that fit)")
    s.add_argument("--with-cifar10", action="store_true", help=f"also {CIFAR10}, spread over the same pieces")
    j = sub.add_parser("join", help="on the GPU machine: the pieces back into the parts, checked")
    j.add_argument("folder", help="where the pieces and the manifest were copied (e.g. /root/data)")
    a = p.parse_args(argv)
    if a.command == "split":
        if a.pieces is not None and a.pieces < 1:
            p.error(f"--pieces must be at least 1, got {a.pieces}")
        manifest = split(a.src, a.dst, a.pieces, a.with_cifar10)
        pieces = json.loads(manifest.read_text())["pieces"]
        largest = max(piece["bytes"] for piece in pieces) / 2**20
        print(
            f"{manifest}: {len(pieces)} pieces of at most {largest:.1f} MiB, one per device call ({len(pieces)} calls)"
        )
    else:
        for path in join(a.folder):
            print(path)


if __name__ == "__main__":
    main()
