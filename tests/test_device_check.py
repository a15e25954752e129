"""The GPU check script stays runnable: its CPU dry run exercises the same code (CI has no GPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow


def test_device_check_dry_run(tmp_path):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.device_check",
        "--dry-run",
        "--out",
        str(tmp_path),
        "--parts",
        "serving",
        "deepspeed",
        "graphs",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "device_check.json").read_text())
    assert result["serving"]["ok"] and all(result["serving"]["greedy_equals_generate"])
    graphs = result["graphs"]  # emulated on the CPU: the same scheduler and equality checks
    assert graphs["ok"] and all(v for r in graphs["equal"].values() for v in r.values())
    assert set(graphs["forward_large_bfloat16"]["variants"]) == {"neither", "shared_shrink", "lora_first", "both"}
    ds = result["deepspeed"]
    assert ds["ok"] and ds["backend"] == "gloo"
    # the Ray worker's engine without Ray: the loss falls, ZeRO-2/3 write ZeRO-0's adapter
    assert all(ds[f"zero{s}"]["final_loss"] < ds[f"zero{s}"]["first_loss"] for s in (0, 2, 3))
    # DeepSpeed 0.19.8's ZeRO-2 drifts from ZeRO-0 by ~1% over 30 bf16 steps (0.17% at 10 steps in the
    # same script, none at 10 steps in fp32): rounding, not a wrong gather, which would be ~100%.
    assert ds["zero2"]["max_rel_diff_vs_zero0"] < 0.05 and ds["zero3"]["max_rel_diff_vs_zero0"] < 0.05


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check runs for real")
def test_device_check_refuses_without_a_gpu(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "--dry-run" in done.stderr
