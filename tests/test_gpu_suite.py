"""``python -m benchmarks gpu``: the dry run (every part at toy sizes on the CPU) writes complete
results, and without a GPU the real run refuses in one line. A real-GPU run is marked ``gpu``."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("kernels", "newton_schulz", "steptime", "convergence")


def suite(*args, timeout=300, threads="1"):
    env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=ROOT)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks", "gpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_results(folder, device):
    with open(os.path.join(folder, "gpu.json")) as f:
        result = json.load(f)
    with open(os.path.join(folder, "gpu.md")) as f:
        md = f.read()
    assert result["commit"] and result["machine"]["torch"] == torch.__version__
    assert "triton" in result["machine"]
    data = result["data"]
    assert data["device"] == device and data["wall_s"] > 0
    parts = data["parts"]
    assert set(parts) == set(PARTS)
    for name in PARTS:
        assert parts[name]["status"] in ("ok", "skipped"), (name, parts[name])
        assert parts[name]["wall_s"] >= 0
    kernels = parts["kernels"]
    if kernels["status"] == "ok":
        dtypes = {r["dtype"] for r in kernels["rows"]}
        assert dtypes == {"float32", "bfloat16"}
        assert all(r["ok"] and 0 <= r["error"] < r["bound"] for r in kernels["rows"])
        assert {"project / float32", "newton_schulz (5 steps) / bfloat16"} <= set(
            kernels["max_error"])
    ns = parts["newton_schulz"]
    assert ns["rows"] and ns["goals"] == {"vs_torch_ns5": 1.3, "of_ceiling": 0.6}
    for row in ns["rows"]:
        assert {"torch NS5", "slimopt torch"} <= set(row["impls"])
        assert row["ceiling_tflops"] > 0 and row["speedup_vs_torch_ns5"] > 0
        assert all(t["ms"] > 0 and t["tflops_executed"] > 0 for t in row["impls"].values())
    steptime = parts["steptime"]
    ratios = {r["optimizer"]: r["ratio_to_fused_adamw"] for r in steptime["rows"]}
    assert ratios["adamw-fused"] == 1.0 and {"galore", "grasswalk"} <= set(ratios)
    runs = {r["method"]: r for r in parts["convergence"]["runs"]}
    assert set(runs) == {"grasswalk", "galore-slimopt", "snsm", "adamw", "galore"}
    tokens = {r["tokens"] for r in runs.values()}
    assert len(tokens) == 1  # equal tokens
    for r in runs.values():
        assert r["status"] == "ok" and 0 < r["eval_loss"] < 20, r
    for heading in ("### 1.", "### 2.", "### 3.", "### 4.", "Skipped:", "torch NS5",
                    "adamw-fused", "galore-slimopt"):
        assert heading in md
    return result


def test_dry_run_writes_every_part(tmp_path):
    proc = suite("--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[gpu] kernels:" in proc.stderr and "[gpu] convergence:" in proc.stderr
    result = check_results(tmp_path / "cpu", "cpu")
    if result["machine"]["triton"]:
        assert result["data"]["parts"]["kernels"]["status"] == "ok"
        assert "slimopt triton" in result["data"]["parts"]["newton_schulz"]["rows"][0]["impls"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_refuses_without_gpu(tmp_path):
    proc = suite("--out", str(tmp_path), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "GPU" in lines[0] and "--dry-run" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_gpu_is_not_in_all():
    from benchmarks.__main__ import EXTRA, SUITES
    assert "gpu" in EXTRA and "gpu" not in SUITES


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run(tmp_path):
    proc = suite("--out", str(tmp_path), "--gpu-budget", "300", timeout=600, threads="4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    from benchmarks.report import device_tag
    result = check_results(tmp_path / device_tag("cuda"), "cuda")
    assert result["data"]["gpu"] == torch.cuda.get_device_name(0)
