"""bench/gpu_check.py: refuses cleanly without CUDA, and its CPU-side setup (every case built
on the meta device, the estimates it compares with) runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda():
    out = _run("--steps", "1")
    assert out.returncode == 2
    assert "needs a CUDA GPU" in out.stderr and "--dry" in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_dry_builds_every_case_on_meta():
    out = _run("--dry", "--resolution", "64", "--flux-blocks", "1,1")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["device"] == "meta (--dry)"
    assert report["sdxl"]["targets"] == 722  # kohya's SDXL UNet targets at full size
    assert report["flux"]["targets"] == report["flux_fp8"]["targets"] == 12 + 3  # one double, one single block (19 x 12 + 38 x 3 = 342 at full depth)
    rows, rows8 = report["flux"]["estimate_rows_mib"], report["flux_fp8"]["estimate_rows_mib"]
    assert rows8["transformer weights"] < 0.51 * rows["transformer weights"]
    assert report["basis_flux_official"]["targets"] == 342
