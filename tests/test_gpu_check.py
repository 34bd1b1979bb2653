"""tools/gpu_check.sh on a machine without CUDA: it runs its CPU parts (reference fixtures through
check_reference.py and through its own device/precision comparison, a tiny launcher run), says that there is
no CUDA device and exits 0 with a JSON and a Markdown summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers_train import REPO

FIXTURE = REPO / "tests" / "fixtures" / "reference" / "vit_tiny_dtl"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only branch needs a machine without CUDA")
def test_gpu_check_cpu_only_branch(tmp_path):
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    (fixtures / FIXTURE.name).symlink_to(FIXTURE)  # one fixture keeps the test short
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, FIXTURES=str(fixtures), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stdout and "the GPU checks were not run" in proc.stdout
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["cuda"] is False
    steps = {s["step"]: s["rc"] for s in report["steps"]}
    assert steps == {"environment": "0", "make_data": "0", "reference_cpu": "0", "fixtures_cpu": "0",
                     "launcher_cpu": "0"}
    rows = json.loads((out / "fixtures_cpu.json").read_text())
    assert [(r["fixture"], r["precision"], r["ok"]) for r in rows] == [("vit_tiny_dtl", "fp32", True),
                                                                     ("vit_tiny_dtl", "bf16", True)]
    assert rows[0]["logits_abs"] <= 1e-4 and rows[0]["grads_rel"] <= 1e-3
    assert json.loads((out / "runs" / "cpu" / "results.json").read_text())["epochs"] == 3
    assert "CPU parts only" in (out / "gpu_check.md").read_text()
    assert not (out / "bench_memory.json").exists()  # GPU parts did not run

