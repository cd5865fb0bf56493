"""Golden runs: with the same seed, each script's smoke run on the CPU gives the metrics recorded in
tests/golden/<name>.json. A restructuring that changes no behaviour keeps them; a change that is
meant to move a number rewrites the record, in its own commit, saying why:

    python tests/test_golden.py write NAME      # reruns NAME's command and records its metrics

Timings (seconds, images/s, latency) are left out: they differ from run to run. On another
processor a few accuracies (at most 1% of a record's numbers, each by at most FLIP_POINTS) may
move: its vector units round differently and flip near-tied predictions of these tiny runs.
"""

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
sys.path.insert(0, str(ROOT))

CPU = ["--device", "cpu", "--dataset", "shapes"]
# name -> (script, argv without --out-dir, VGG configurations to shrink (coarse_outer_product's VGGs))
RUNS = {
    "hiernet": (
        "hiernet",
        [*CPU, "--train-size", "192", "--test-size", "800", "--image-size", "8", "--n", "1", "--split", "1"]
        + ["--extra-blocks", "1", "--iterations", "6", "--batch-size", "64", "--g-max", "20", "--control"],
        None,
    ),
    "merged_resnet": (
        "merged_resnet",
        [*CPU, "--train-size", "400", "--test-size", "100", "--image-size", "16", "--epochs", "1"]
        + [
            "--batch-size",
            "32",
            "--eval-batch-size",
            "250",
            "--depth",
            "11",
            "--runs",
            "2",
            "--val-fraction",
            "0.1",
            "--dry-run",
        ],
        None,
    ),
    "coarse_outer_product": (
        "coarse_outer_product",
        [*CPU, "--image-size", "32", "--train-size", "300", "--test-size", "100", "--val-per-class", "1"]
        + ["--batch-size", "16", "--epochs", "1", "--coarse-epochs", "1", "--pretrain-epochs", "1"]
        + ["--recovery-epochs", "1", "--ch-restarts", "1", "--coarse-k", "4"],
        {13: [8, "M", 8, "M", 8, "M", 8, "M", 512, "M"], 16: [8, "M", 8, "M", 8, 8, "M", 8, "M", 512, "M"]},
    ),
    "latent_string": (
        "latent_string",
        [*CPU, "--train-size", "300", "--test-size", "120", "--image-size", "28", "--backbone", "lenet"]
        + ["--epochs", "1", "--lh-epochs", "2", "--batch-size", "64", "--lh-batch-size", "64"]
        + ["--bits-sweep", "6,7", "--hidden-sweep", "20,40", "--repair-epochs", "2", "--val-per-class", "1"],
        None,
    ),
    "hdl_stack": (
        "hdl_stack",
        [*CPU, "--train-size", "96", "--test-size", "48", "--image-size", "16", "--epochs", "1"]
        + ["--batch-size", "48"],
        None,
    ),
}

FLIP_POINTS = 2.5  # one or two images of the smallest evaluation set, in accuracy points
TIMING = re.compile(r"second|per_s|latency|_ms\b|ms_|wall|time|throughput|speed", re.IGNORECASE)


def numbers(obj, path=""):
    """Every number of a metrics.json by its path, timings left out."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if not TIMING.search(str(key)):
                out.update(numbers(value, f"{path}/{key}"))
        return out
    if isinstance(obj, list):
        out = {}
        for i, value in enumerate(obj):
            out.update(numbers(value, f"{path}/{i}"))
        return out
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return {}
    return {path: obj}


def run(name, out_dir, monkeypatch=None):
    script, argv, vgg = RUNS[name]
    module = importlib.import_module(script)
    if vgg is not None:
        import common

        saved = dict(common.VGG_CONFIGS)
        common.VGG_CONFIGS.update(vgg)
    try:
        module.main([*argv, "--out-dir", str(out_dir)])
    finally:
        if vgg is not None:
            common.VGG_CONFIGS.clear()
            common.VGG_CONFIGS.update(saved)
    return numbers(json.loads((Path(out_dir) / "metrics.json").read_text()))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_seed_gives_the_recorded_metrics(name, tmp_path):
    path = GOLDEN / f"{name}.json"
    if not path.exists():
        pytest.fail(f"no golden record: python tests/test_golden.py write {name}")
    recorded = json.loads(path.read_text())
    assert recorded["argv"] == RUNS[name][1], "the command changed: record it again"
    got = run(name, tmp_path / "run")
    expected = recorded["metrics"]
    assert sorted(got) == sorted(expected), "metrics.json gained or lost numbers"
    assert same_metrics(got, expected)


def same_metrics(got, expected):
    """Equal within float tolerance, but for a few near-tie flips: processors with other vector
    units round differently, which can flip a near-tied prediction of the tiny smoke runs, moving an
    accuracy by an image or two; a change of behaviour moves more numbers, or further."""
    differ = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-4)}
    flips = {k: d for k, d in differ.items() if abs(d[0] - d[1]) <= FLIP_POINTS}
    assert len(differ) == len(flips) <= max(1, len(expected) // 100), (
        f"{len(differ)} numbers moved, e.g. {dict(list(differ.items())[:5])}"
    )
    return True


def test_a_near_tie_flip_passes_and_a_change_of_behaviour_fails():
    expected = {f"/acc/{i}": 50.0 + i / 10 for i in range(300)}
    assert same_metrics({**expected, "/acc/7": expected["/acc/7"] + 1.39}, expected)  # one image of 72
    with pytest.raises(AssertionError, match="4 numbers moved"):  # more than 1% of the numbers
        same_metrics({**expected, **{f"/acc/{i}": 0.0 + i for i in range(4)}}, expected)
    with pytest.raises(AssertionError, match="1 numbers moved"):  # one number, but far
        same_metrics({**expected, "/acc/7": expected["/acc/7"] + 5}, expected)


if __name__ == "__main__":
    import tempfile

    if len(sys.argv) != 3 or sys.argv[1] != "write" or sys.argv[2] not in RUNS:
        sys.exit(f"usage: python tests/test_golden.py write {{{','.join(sorted(RUNS))}}}")
    name = sys.argv[2]
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run(name, Path(tmp) / "run")
    GOLDEN.mkdir(exist_ok=True)
    record = {"script": RUNS[name][0], "argv": RUNS[name][1], "metrics": metrics}
    (GOLDEN / f"{name}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"tests/golden/{name}.json: {len(metrics)} numbers")
