"""The research examples in examples/ run end to end (tiny settings), so they never rot."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, options", [
    ("noise_optimisation.py", ["--prompts", "4", "--iterations", "2", "--steps", "2"]),
    ("reward_finetuning.py", ["--iterations", "2", "--batch", "2", "--steps", "2", "--held-out", "4"]),
])
def test_example_runs(script, options, tiny_sd_folder):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), str(tiny_sd_folder), *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "iteration 2/2: mean reward" in result.stdout
    assert "whole_scene_accuracy:" in result.stdout
