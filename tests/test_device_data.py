"""tools/device_data.py: CIFAR-100's parts cut into pieces for the device calls and joined back, checked."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import device_data

ROOT = Path(__file__).resolve().parent.parent
PART_BYTES = (53_257_219, 52_606_977)  # ../shared/data/cifar100_webp_{a,b}.npz
CIFAR10_BYTES = 18_386_001  # ../shared/data/cifar10_jpeg.npz


@pytest.fixture
def parts(tmp_path):
    src = tmp_path / "shared"
    src.mkdir()
    rng = np.random.default_rng(0)
    for name, size in zip(device_data.PARTS, (1001, 777)):
        (src / name).write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return src


def machine_copy(here, machine, names):
    machine.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(here / name, machine / name)


def test_split_then_join_gives_the_parts_back_byte_for_byte(parts, tmp_path):
    here, machine = tmp_path / "data", tmp_path / "root_data"
    device_data.split(parts, here, 3)
    pieces = sorted(p.name for p in here.glob("cifar100_piece*.bin"))
    assert len(pieces) == 3 and sum((here / p).stat().st_size for p in pieces) == 1001 + 777
    sizes = [(here / p).stat().st_size for p in pieces]
    assert max(sizes) - min(sizes) <= 2  # equal pieces, so no call carries more than its share
    machine_copy(here, machine, [*pieces, device_data.MANIFEST])
    joined = device_data.join(machine)
    assert [p.name for p in joined] == list(device_data.PARTS)
    for name in device_data.PARTS:
        assert (machine / name).read_bytes() == (parts / name).read_bytes()


def test_join_names_a_missing_or_damaged_piece(parts, tmp_path):
    here, machine = tmp_path / "data", tmp_path / "root_data"
    device_data.split(parts, here, 2)
    machine_copy(here, machine, ["cifar100_piece0.bin", device_data.MANIFEST])
    with pytest.raises(SystemExit, match="cifar100_piece1.bin not found"):
        device_data.join(machine)
    damaged = bytearray((here / "cifar100_piece1.bin").read_bytes())
    damaged[5] ^= 1
    (machine / "cifar100_piece1.bin").write_bytes(bytes(damaged))
    with pytest.raises(SystemExit, match="piece1.bin is damaged"):
        device_data.join(machine)
    assert not (machine / device_data.PARTS[0]).exists()  # nothing written from a damaged piece


def test_split_refuses_a_missing_part_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "device_data.py"), "split", str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        check=False,
        text=True,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "cifar100_webp_a.npz not found" in result.stderr


def test_checkout_leaves_room_for_a_piece_in_one_device_call():
    """A device call carries at most 64 MiB: the tracked files, one piece (a third of CIFAR-100's two parts and
    CIFAR-10's copy, --with-cifar10), the official order (0.2 MB) and the unpack scripts. This fails before the
    checkout outgrows that route."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = sum(os.path.getsize(ROOT / f) for f in listed.stdout.decode().split("\0") if f and (ROOT / f).is_file())
    piece = -(-(sum(PART_BYTES) + CIFAR10_BYTES) // 3)
    assert tracked + piece + 200_000 + 10_000 < 64 * 2**20 - 4 * 2**20, f"tracked files: {tracked / 2**20:.1f} MiB"


def test_a_folder_that_cannot_be_written_is_one_line(parts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write"):
        device_data.split(parts, blocker / "data", 3)


def test_with_cifar10_the_pieces_carry_its_copy_too_and_the_queue_unpacks_it_in_the_data_root(
    parts, tmp_path, monkeypatch
):
    """--with-cifar10: CIFAR-10's JPEG copy is spread over the same pieces and joined back byte for byte;
    gpu_runs, given that folder as --data-root, unpacks it there (with the unpack script split copied)."""
    rng = np.random.default_rng(1)
    (parts / device_data.CIFAR10).write_bytes(rng.integers(0, 256, 555, dtype=np.uint8).tobytes())
    unpack = "import pathlib, sys; d = pathlib.Path(sys.argv[1]) / 'cifar-10-batches-py'; d.mkdir(); (d / 'test_batch').write_text(sys.argv[-1])"
    (parts / "unpack_cifar10_jpeg.py").write_text(unpack)
    here, machine = tmp_path / "data", tmp_path / "root_data"
    device_data.split(parts, here, 3, with_cifar10=True)
    assert (here / "unpack_cifar10_jpeg.py").read_text() == unpack  # a companion, copied beside the pieces
    pieces = sorted(p.name for p in here.glob("cifar100_piece*.bin"))
    assert sum((here / p).stat().st_size for p in pieces) == 1001 + 777 + 555
    machine_copy(here, machine, [*pieces, device_data.MANIFEST, "unpack_cifar10_jpeg.py"])
    assert [p.name for p in device_data.join(machine)] == [*device_data.PARTS, device_data.CIFAR10]
    assert (machine / device_data.CIFAR10).read_bytes() == (parts / device_data.CIFAR10).read_bytes()

    sys.path.insert(0, str(ROOT / "tools"))
    import gpu_runs

    monkeypatch.setattr(gpu_runs, "ROOT", tmp_path / "checkout")  # no data/ copy of its own: the root's is unpacked
    (tmp_path / "checkout").mkdir()
    gpu_runs.ensure_cifar10(machine)
    assert (machine / "cifar-10-batches-py" / "test_batch").read_text() == str(machine / device_data.CIFAR10)
    (machine / "cifar-10-batches-py" / "test_batch").unlink()
    (machine / "unpack_cifar10_jpeg.py").unlink()
    with pytest.raises(SystemExit, match="unpack_cifar10_jpeg.py not found beside"):  # one line, not a traceback
        gpu_runs.ensure_cifar10(machine)
    (machine / "cifar-10-batches-py" / "test_batch").write_text("unpacked")
    gpu_runs.link_data(machine)
    assert (gpu_runs.ROOT / "data" / "cifar-10-batches-py").resolve() == (machine / "cifar-10-batches-py").resolve()
