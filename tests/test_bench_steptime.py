"""The step-time suite (benchmarks/steptime.py) on tiny workloads: timing properties, skipped
and over-limit optimizers, the files run() writes, and option validation."""
import argparse
import json
import os
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

transformers = pytest.importorskip("transformers")
import benchmarks.steptime as steptime  # noqa: E402
from benchmarks.report import stamp  # noqa: E402


def tiny_block():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      num_hidden_layers=1)
    block = transformers.models.llama.modeling_llama.LlamaDecoderLayer(config, layer_idx=0)
    steptime.set_gradients(block)
    return block


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    steptime.add_arguments(p.add_argument_group("steptime"))
    return p


def test_measure_ratios_and_amortization():
    interval = 10
    rows, skipped = steptime.measure(tiny_block(), ["adamw", "galore-slimopt"], rank=8,
                                     interval=interval, measure_interval=3, repeats=2)
    assert skipped == {}
    by_name = {row["optimizer"]: row for row in rows}
    assert set(by_name) == {"adamw-fused", "adamw", "galore-slimopt"}  # the reference is added
    assert by_name["adamw-fused"]["ratio_to_fused_adamw"] == 1.0
    assert [r["ratio_to_fused_adamw"] for r in rows] == sorted(r["ratio_to_fused_adamw"]
                                                               for r in rows)
    for row in rows:
        assert row["regular_ms"] > 0 and row["amortized_ms"] > 0
        assert row["params"] == sum(p.numel() for p in tiny_block().parameters())
    dense = by_name["adamw"]
    assert dense["refresh_ms"] is None and dense["rank"] is None
    assert dense["amortized_ms"] == dense["regular_ms"]
    low = by_name["galore-slimopt"]
    assert low["rank"] == 8 and low["refresh_ms"] > 0
    assert (min(low["regular_ms"], low["refresh_ms"]) <= low["amortized_ms"]
            <= max(low["regular_ms"], low["refresh_ms"]))
    assert low["amortized_ms"] == pytest.approx(
        (low["refresh_ms"] + (interval - 1) * low["regular_ms"]) / interval)
    assert low["ratio_to_fused_adamw"] == pytest.approx(
        low["amortized_ms"] / by_name["adamw-fused"]["amortized_ms"])


class SlowOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        time.sleep(5)


def test_missing_package_and_over_limit_are_skipped(monkeypatch):
    real = steptime.build_optimizer

    def fake(name, module, **options):
        if name == "galore":
            raise ValueError("the galore peer needs galore-torch: pip install galore-torch")
        if name == "muon":
            return SlowOptimizer(module.parameters(), lr=1e-3)
        return real(name, module, **options)
    monkeypatch.setattr(steptime, "build_optimizer", fake)
    t0 = time.perf_counter()
    rows, skipped = steptime.measure(tiny_block(), ["galore", "muon", "adamw"], rank=8,
                                     measure_interval=2, repeats=1, max_step=0.2)
    assert time.perf_counter() - t0 < 4  # the slow step was stopped, not waited for
    assert [r["optimizer"] for r in rows if r["optimizer"] != "adamw-fused"] == ["adamw"]
    assert "pip install galore-torch" in skipped["galore"]
    assert "limit" in skipped["muon"]


def test_run_writes_stamped_results(tmp_path):
    args = parser().parse_args(["--quick", "--steptime-optimizers", "adamw", "subsetnorm",
                                "--steptime-repeats", "1", "--steptime-measure-interval", "2"])
    info = stamp("cpu", ["steptime", "--quick"])
    threads = torch.get_num_threads()
    paths = steptime.run(args, str(tmp_path), info)
    assert torch.get_num_threads() == threads  # restored
    assert sorted(os.path.basename(p) for p in paths) == ["steptime.json", "steptime.md",
                                                          "steptime.png"]
    data = json.load(open(tmp_path / "steptime.json"))
    assert data["command"] == "python -m benchmarks steptime --quick" and data["commit"]
    assert data["data"]["settings"]["torch_threads"] == 1
    rows = data["data"]["rows"]
    assert {r["workload"] for r in rows} == {"block-60m"}
    assert {r["optimizer"] for r in rows} == {"adamw-fused", "adamw", "subsetnorm"}
    md = (tmp_path / "steptime.md").read_text()
    assert md.startswith("Command: `python -m benchmarks steptime --quick`")
    assert "### block-60m" in md and "| adamw-fused | torch |" in md and "| 1.00 |" in md


@pytest.mark.parametrize("argv", [["--steptime-workloads", "block-2b"],
                                  ["--steptime-repeats", "0"],
                                  ["--steptime-measure-interval", "1"],
                                  ["--steptime-optimizers", "sgd"]])
def test_bad_options_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(argv)
    assert f"argument {argv[0]}" in capsys.readouterr().err


def test_bad_values_are_refused_by_the_functions():
    with pytest.raises(ValueError, match="unknown workload"):
        steptime.build_workload("block-2b")
    with pytest.raises(ValueError, match="repeats"):
        steptime.measure(tiny_block(), ["adamw"], rank=8, repeats=0)


def test_variants_build_the_named_optimizer_with_options():
    assert steptime.split_variant("grassjump:store_basis=True,svd=randomized") == (
        "grassjump", {"store_basis": True, "svd": "randomized"})
    assert steptime.split_variant("galore-slimopt") == ("galore-slimopt", {})
    args = parser().parse_args(["--steptime-optimizers", "grassjump:store_basis=True"])
    assert args.steptime_optimizers == ["grassjump:store_basis=True"]
    with pytest.raises(ValueError, match="NAME:key=value"):
        steptime.split_variant("grassjump:store_basis")
    rows, _ = steptime.measure(tiny_block(), ["grassjump", "grassjump:store_basis=True"], rank=8,
                               repeats=1, measure_interval=2)
    assert {r["optimizer"] for r in rows} == {"adamw-fused", "grassjump",
                                              "grassjump:store_basis=True"}
    assert all(r["library"] == "slimopt" for r in rows if r["optimizer"] != "adamw-fused")


def test_refresh_stalls_quick_writes_the_table(tmp_path):
    from benchmarks import refresh_stalls
    paths = refresh_stalls.main(["--quick", "--configs", "galore-slimopt",
                                 "galore-slimopt:stagger_refresh=True", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "refresh_stalls.json").read_text())
    rows = {r["optimizer"]: r for r in data["data"]["rows"]}
    assert set(rows) == {"galore-slimopt", "galore-slimopt:stagger_refresh=True"}
    assert all(r["steps"] == 8 and r["max_ms"] >= r["median_ms"] > 0 for r in rows.values())
    # all at once: one step of the interval refreshes all 7 matrices (an SVD each)
    assert rows["galore-slimopt"]["steps_over_2x"] >= 1
    assert len(paths) == 2 and (tmp_path / "refresh_stalls.md").read_text().startswith("Command:")
