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
    """A device call carries at most 64 MiB: the tracked files, one piece (a third of CIFAR-100's two parts),
    the official order (0.2 MB) and the unpack script. This fails before the checkout outgrows that route."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    tracked = sum(os.path.getsize(ROOT / f) for f in listed.stdout.decode().split("\0") if f and (ROOT / f).is_file())
    piece = -(-sum(PART_BYTES) // 3)
    assert tracked + piece + 200_000 + 10_000 < 64 * 2**20 - 4 * 2**20, f"tracked files: {tracked / 2**20:.1f} MiB"


def test_a_folder_that_cannot_be_written_is_one_line(parts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write"):
        device_data.split(parts, blocker / "data", 3)
