"""Smoke test of benchmarks/finetune_lora.py: --quick mode end to end, into a temporary folder."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location(
        "slimopt_bench_finetune_lora", os.path.join(ROOT, "benchmarks", "finetune_lora.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_benchmark_quick(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    bench = _load()
    METHODS = bench.METHODS
    assert {"lora-adamw", "loraplus", "riemannian", "adaprelora", "adafactor-full"} <= set(METHODS)
    out = tmp_path / "out"
    result = bench.main(["--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                         "--no-plot"])
    printed = capsys.readouterr().out
    assert "| adaprelora |" in printed

    with open(out / "finetune_lora.json") as f:
        saved = json.load(f)
    assert saved["summary"].keys() == result["summary"].keys() == set(METHODS)
    assert saved["command"].startswith("python benchmarks/finetune_lora.py --quick")
    md = (out / "finetune_lora.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| adaprelora | ")]
    assert len(rows) == 2 and " (" in rows[0]  # the main table's row (best lr (grid)), per-lr row
    for key in ("c2_val", "c2_test", "c1_test"):
        assert math.isfinite(saved["baseline"][key])
    for method in METHODS:
        s = saved["summary"][method]
        if method == "riemannian" and s["status"] == "failed":
            # recorded, not crashed (e.g. a peft without create_riemannian_optimizer)
            assert s["notes"]
            continue
        assert s["status"] == "ok", (method, s)
        for key in ("c2_val", "c2_test", "c1_test"):
            assert s[key] is not None and math.isfinite(s[key]), (method, key, s[key])
        run = next(r for r in saved["runs"] if r["method"] == method)
        assert run["steps_done"] == saved["config"]["steps"]
        assert all(math.isfinite(x) for x in run["train_loss"])
        assert s["state_bytes"] > 0

    # state: AdaPreLoRA keeps (m + n) statistics + (m + n) r momentum per pair, AdamW 2 (m + n) r
    apl, adamw = saved["summary"]["adaprelora"], saved["summary"]["lora-adamw"]
    r = apl["rank"]
    sum_mn = sum(m + n for m, n in apl["lora_pairs"])
    assert apl["lora_pairs"] == adamw["lora_pairs"] and len(apl["lora_pairs"]) == 14
    assert apl["state_bytes"] <= 4 * sum_mn * (r + 1)
    assert adamw["state_bytes"] >= 4 * 2 * sum_mn * r
    assert apl["state_bytes"] < 0.6 * adamw["state_bytes"]  # (r + 1) / 2r = 0.5625 at r = 8
    assert saved["summary"]["loraplus"]["state_bytes"] == adamw["state_bytes"]
    if "adaprelora-beta1=0" in saved["summary"]:  # statistics only: (m + n) per pair
        assert saved["summary"]["adaprelora-beta1=0"]["state_bytes"] == 4 * sum_mn
    assert saved["summary"]["adaprelora-steps"]["state_bytes"] == apl["state_bytes"]
    assert saved["summary"]["adaprelora"]["trainable_params"] == \
        saved["summary"]["lora-adamw"]["trainable_params"]


def test_finetune_benchmark_rejects_bad_arguments(capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    bench = _load()
    for bad in (["--steps", "0"], ["--steps", "x"], ["--batch", "-1"], ["--lrs", "0"],
                ["--clip", "-1"], ["--methods", "sgd"], ["--name", "a/b"], ["--name", ""]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(bad)
        assert info.value.code == 2, bad
    with pytest.raises(SystemExit) as info:
        bench.parse_args(["--help"])
    assert info.value.code == 0
    assert "pydoc_data" in capsys.readouterr().out


def test_finetune_benchmark_records_a_missing_riemannian_optimizer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    peft_optimizers = pytest.importorskip("peft.optimizers")
    monkeypatch.delattr(peft_optimizers, "create_riemannian_optimizer", raising=False)
    bench = _load()
    result = bench.main(["--quick", "--methods", "riemannian", "lora-adamw", "--out",
                         str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
                         "--no-plot", "--steps", "2"])
    s = result["summary"]["riemannian"]
    assert s["status"] == "failed" and "ImportError" in s["notes"]
    assert result["summary"]["lora-adamw"]["status"] == "ok"
    assert "| riemannian | n/a" in (tmp_path / "out" / "finetune_lora.md").read_text()


def test_finetune_benchmark_seed_and_name(tmp_path):
    """--seed is part of the pretrain cache key (a second seed pretrains again); --name is the
    stem of the result files, the image link included."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    bench = _load()
    common = ["--quick", "--methods", "adaprelora", "--out", str(tmp_path / "out"),
              "--cache-dir", str(tmp_path / "cache"), "--steps", "2", "--pretrain-steps", "2"]
    first = bench.main(common + ["--seed", "1", "--name", "ft_seed1"])
    if os.path.exists(tmp_path / "out" / "ft_seed1.png"):  # with matplotlib
        assert "(ft_seed1.png)" in (tmp_path / "out" / "ft_seed1.md").read_text()
    again = bench.main(common + ["--seed", "1", "--name", "ft_seed1", "--no-plot"])
    other = bench.main(common + ["--seed", "2", "--name", "ft_seed2", "--no-plot"])
    assert not first["pretrain"]["cached"] and again["pretrain"]["cached"]
    assert again["pretrain"]["checkpoint"] == first["pretrain"]["checkpoint"]
    assert not other["pretrain"]["cached"]
    assert other["pretrain"]["checkpoint"] != first["pretrain"]["checkpoint"]
    assert first["config"]["seed"] == 1 and other["config"]["seed"] == 2
    assert other["baseline"] != first["baseline"]
    names = sorted(os.listdir(tmp_path / "out"))
    assert {"ft_seed1.json", "ft_seed1.md", "ft_seed2.json", "ft_seed2.md"} <= set(names)
    assert not any(n.startswith("finetune_lora") for n in names)
