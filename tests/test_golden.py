"""Golden runs: with the same seed, each script's smoke run on the CPU gives the metrics recorded in
tests/golden/<name>.json. A restructuring that changes no behaviour keeps them; a change that is
meant to move a number rewrites the record, in its own commit, saying why:

    python tests/test_golden.py write NAME      # reruns NAME's command and records its metrics

Timings (seconds, images/s, latency) are left out: they differ from run to run.
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
    differ = {k: (got[k], v) for k, v in expected.items() if not math.isclose(got[k], v, rel_tol=1e-4, abs_tol=1e-4)}
    assert not differ, f"{len(differ)} numbers moved, e.g. {dict(list(differ.items())[:5])}"


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
