"""tools/device_data.py: CIFAR-100's parts cut into pieces for the device calls and joined back, checked."""

import json
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


def test_checkout_leaves_room_for_three_pieces_in_three_device_calls():
    """A device call carries at most 64 MiB: the checkout's travelling files, one piece (CIFAR-100's two parts and
    CIFAR-10's copy, --with-cifar10, in equal pieces), the official order (0.2 MB) and the unpack scripts. split
    adds pieces as the checkout grows; this fails before the route needs more than three calls."""
    checkout = device_data.travelling_bytes()
    if checkout is None:
        pytest.skip("not a git checkout")
    pieces = device_data.pieces_needed(sum(PART_BYTES) + CIFAR10_BYTES, checkout, 200_000 + 10_000)
    assert pieces <= 3, f"the checkout's {checkout / 2**20:.1f} MiB leave room for {pieces} pieces"


@pytest.mark.parametrize("checkout_mib", [0, 16, 30, 45])
def test_split_cuts_the_fewest_pieces_that_each_fit_a_call_beside_the_checkout(checkout_mib):
    """Every piece, with the checkout, the first call's companions and manifest and the spare, fits 64 MiB; one
    piece fewer would not."""
    data, companions, checkout = sum(PART_BYTES) + CIFAR10_BYTES, 210_000, checkout_mib * 2**20
    first_call = checkout + companions + 65536 + device_data.SPARE_BYTES
    fits = lambda n: first_call + -(-data // n) <= 64 * 2**20  # noqa: E731
    pieces = device_data.pieces_needed(data, checkout, companions)
    assert fits(pieces) and (pieces == 1 or not fits(pieces - 1))
    assert pieces == {0: 2, 16: 3, 30: 4, 45: 8}[checkout_mib]


def test_split_adds_pieces_for_a_larger_checkout_and_refuses_a_count_that_does_not_fit(parts, tmp_path):
    here = tmp_path / "data"
    room = 600  # bytes of data a call has room for beside this checkout
    checkout = device_data.CALL_BYTES - device_data.SPARE_BYTES - 65536 - room
    device_data.split(parts, here, checkout_bytes=checkout)  # 1001 + 777 bytes: three pieces of at most 600
    manifest = json.loads((here / device_data.MANIFEST).read_text())
    assert [p["bytes"] for p in manifest["pieces"]] == [593, 593, 592]
    with pytest.raises(SystemExit, match="2 pieces of .* do not fit a device call .* pass --pieces 3 or more"):
        device_data.split(parts, tmp_path / "two", 2, checkout_bytes=checkout)
    assert not (tmp_path / "two").exists()  # nothing written
    for checkout in (device_data.CALL_BYTES, device_data.CALL_BYTES - device_data.SPARE_BYTES - 65536 - 200):
        with pytest.raises(SystemExit, match="too little room in a device call of 64 MiB for the data in 8 calls"):
            device_data.split(parts, tmp_path / "none", checkout_bytes=checkout)  # no room; 9 pieces of 200
        assert not (tmp_path / "none").exists()


def test_travelling_bytes_counts_tracked_and_unignored_files_not_ignored_ones(tmp_path, tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("no git")
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / ".gitignore").write_text("data/\n")  # 6 bytes
    (tmp_path / "tracked.py").write_bytes(b"x" * 100)
    git("add", ".gitignore", "tracked.py")
    (tmp_path / "untracked.txt").write_bytes(b"y" * 20)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "piece.bin").write_bytes(b"z" * 5000)
    assert device_data.travelling_bytes(tmp_path) == 6 + 100 + 20
    (tmp_path / "tracked.py").unlink()  # deleted but still in the index: not copied, not counted
    assert device_data.travelling_bytes(tmp_path) == 6 + 20
    assert device_data.travelling_bytes(tmp_path / "data" / "..") == 6 + 20
    plain = tmp_path_factory.mktemp("not_a_checkout")
    if subprocess.run(["git", "rev-parse"], cwd=plain, capture_output=True).returncode != 0:  # /tmp outside any repo
        assert device_data.travelling_bytes(plain) is None


def test_split_outside_a_git_checkout_is_one_line(parts, tmp_path, monkeypatch):
    monkeypatch.setattr(device_data, "travelling_bytes", lambda root=None: None)
    with pytest.raises(SystemExit, match="cannot count the files that travel with a device call"):
        device_data.split(parts, tmp_path / "data")
    assert not (tmp_path / "data").exists()


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
