"""bench/device.py --smoke: the accelerator benchmark runs end to end (tiny shapes, CPU), so it does
not rot between the times someone has a GPU or TPU host to run it on."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_benchmark_smoke(tmp_path):
    out = tmp_path / "device.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "device.py"), "--smoke", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dtype"] == "bfloat16" and report["diffusers_device"] == "cpu"
    by_model = {r["model"]: r for r in report["results"]}
    assert sorted(by_model) == ["flux", "sd15", "sdxl"]
    for model, result in by_model.items():
        cold, warm, reference = result["jdiff"], result["jdiff_warm"], result["diffusers"]
        for side in (cold, warm, reference):
            assert "error" not in side, (model, side)
        # Every batch size and step count was run, one program serving the step counts.
        expected = {"sd15": [(1, 2), (2, 2)], "sdxl": [(1, 2)], "flux": [(1, 1), (1, 2)]}[model]
        assert [(r["batch"], r["steps"]) for r in cold["runs"]] == expected
        assert [(r["batch"], r["steps"]) for r in reference["runs"]] == expected
        assert all(r["images_per_s"] > 0 for r in cold["runs"] + reference["runs"])
        assert cold["cache_hits"] == 0  # the cold process compiled everything itself
        assert warm["cache_hits"] > 0  # the warm one read the programs the cold one wrote
        assert warm["platform"] == "cpu" and cold["peak_device_bytes"] is None  # CPU devices keep no memory stats
    assert "images/s" in done.stdout and "sd15" in done.stdout
