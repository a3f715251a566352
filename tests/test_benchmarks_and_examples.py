"""The memory benchmark (``python -m benchmarks memory``): its counts checked against the shapes
and the peers, its FSDP2 per-rank table (the planner itself), its files; and the quickstart runs."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(relpath, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def memory():
    pytest.importorskip("transformers")
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from benchmarks import memory
    return memory


def _installed(module):
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def test_memory_counts_on_meta_match_the_shapes(memory):
    rows = memory.measure(["60m"], [128, 512], progress=lambda s: None)
    got = {(r["optimizer"], r["rank"]): r["bytes"] for r in rows}
    hidden, inter, _, layers = memory.LLAMA_SHAPES["60m"]
    n = rows[0]["params"]
    model = memory.llama_on_meta("60m")
    params = list(model.parameters())
    assert n == sum(p.numel() for p in params) and len(params) == 9 * layers + 3
    # fp32 exp_avg + exp_avg_sq (2 * 4 bytes per parameter) + a 4-byte step per tensor
    assert got[("AdamW (torch)", None)] == 2 * 4 * n + 4 * len(params)
    # rank 128: per layer 4 (hidden x hidden) and 3 (hidden x inter) projections
    low = 4 * (2 * 128 * hidden + hidden * 128) + 3 * (2 * 128 * inter + hidden * 128)
    low_params = (4 * hidden * hidden + 3 * hidden * inter) * layers
    dense = n - low_params
    # GrassWalk's recovery keeps the limiter's norm: a 0-d float32 tensor per matrix
    assert got[("GrassWalk", 128)] == 4 * (2 * dense + layers * low) + 4 * 7 * layers
    no_basis = 4 * (2 * dense + layers * (4 * 2 * 128 * hidden + 3 * 2 * 128 * inter))
    assert got[("GrassJump", 128)] == no_basis
    # rank 512 = hidden: slimopt falls back to dense AdamW
    assert got[("GrassWalk", 512)] == 8 * n
    # every slimopt optimizer, at each rank where it takes one
    for name, key in memory.SLIMOPT.items():
        for rank in ([128, 512] if key in memory.RANKED else [None]):
            assert got[(name, rank)] is not None, (name, rank)
    assert got[("SubspaceMomentum", 128)] < got[("SNSM", 128)]  # no subset-norm accumulators
    # the peers: Muon keeps one fp32 momentum per projection, AdamW on the rest
    low_tensors = 7 * layers
    assert got[("Muon + AdamW (torch)", None)] == (4 * low_params + 8 * dense
                                                    + 4 * (len(params) - low_tensors))
    if _installed("torch_optimizer"):
        # Adafactor (no first moment): row + column second moments per matrix, full per vector,
        # and a 0-dim RMS per tensor; the shape-only stand-in for its max() is undone
        factored = sum(sum(p.shape) if p.dim() == 2 else p.numel() for p in params)
        assert got[("Adafactor (torch-optimizer)", None)] == 4 * (factored + len(params))
        import torch_optimizer.adafactor as af
        assert "max" not in vars(af)
    if _installed("galore_torch"):
        assert got[("GaLore (slimopt)", 128)] == got[("GaLoreAdamW (galore-torch)", 128)]
        assert got[("GaLoreAdamW (galore-torch)", 512)] > 8 * n  # no dense fallback there
    if _installed("apollo_torch"):
        assert got[("APOLLO-Mini (apollo-torch)", 1)] < got[("APOLLO (apollo-torch)", 128)]
    if _installed("fira"):
        assert got[("FiraAdamW (fira)", 128)] is not None


def test_memory_fsdp_per_rank_table_is_the_planner(memory):
    from slimopt.distributed.fsdp import plan
    worlds = [1, 2, 4, 64]
    rows = memory.fsdp_table("60m", 128, worlds, progress=lambda s: None)
    model = memory.llama_on_meta("60m")
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    by = {(r["optimizer"], r["world"]): r for r in rows}
    assert {r["optimizer"] for r in rows} == set(memory.SLIMOPT) | {"AdamW (torch)"}
    # AdamW: two fp32 moments split by rows, a 4-byte step per parameter on every rank
    adamw = by[("AdamW (torch)", 1)]
    assert adamw["state_per_rank"] == [2 * 4 * n + 4 * len(params)]
    assert adamw["state_max"] == memory.slimopt.state_bytes(memory.build_on_meta("adamw", model,
                                                                                 None))
    for world in worlds[1:]:
        state = by[("AdamW (torch)", world)]["state_per_rank"]
        assert len(state) == world and sum(state) == 8 * n + 4 * len(params) * world
    for name, key in memory.SLIMOPT.items():
        opt = memory.build_on_meta(key, model, 128 if key in memory.RANKED else None)
        single = memory.slimopt.state_bytes(opt)
        assert by[(name, 1)]["state_per_rank"] == [single]
        for world in worlds:
            r = by[(name, world)]
            # the table is the planner: every rank's bytes, as plan() gives them
            assert r["state_per_rank"] == list(plan(opt, world).per_rank), (name, world)
            assert r["state_max"] == max(r["state_per_rank"])
            assert r["balance"] == pytest.approx(r["state_max"] * world / sum(r["state_per_rank"]))
            assert r["vs_adamw"] == r["state_max"] / by[("AdamW (torch)", world)]["state_max"]
    # 56 projections and the dense parameters split by rows: halves at 2 ranks, balanced at 4
    walk = {w: by[("GrassWalk", w)] for w in worlds}
    assert walk[2]["state_max"] <= 0.51 * walk[1]["state_max"]
    assert walk[4]["balance"] <= 1.1
    assert memory.per_rank_configs(memory.SIZES, memory.RANKS) == [("1b", 256), ("7b", 1024)]
    assert memory.per_rank_configs(["60m", "130m"], [128, 512]) == [("130m", 128)]


def test_memory_suite_run_writes_files(memory, tmp_path):
    import argparse
    import json

    from benchmarks import report
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    memory.add_arguments(parser.add_argument_group("memory suite"))
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-ranks", "0"])
    worlds = [1, 2, 4, 8, 64, 512]
    assert memory.settings(parser.parse_args([])) == (memory.SIZES, memory.RANKS, worlds)
    quick = memory.settings(parser.parse_args(["--quick"]))
    assert quick == (memory.QUICK_SIZES, memory.QUICK_RANKS, worlds)
    assert memory.settings(parser.parse_args(["--memory-world-sizes", "8", "2", "8"]))[2] == [2, 8]
    # --quick at one size (60m: the test's time budget); the full --quick is timed in the report
    argv = ["memory", "--quick", "--memory-sizes", "60m"]
    paths = memory.run(parser.parse_args(argv[1:]), str(tmp_path), report.stamp("cpu", argv))
    assert sorted(os.path.basename(p) for p in paths) == ["memory.json", "memory.md",
                                                          "memory.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert saved["command"] == "python -m benchmarks " + " ".join(argv)
    data = saved["data"]
    assert data["sizes"] == ["60m"] and data["ranks"] == memory.QUICK_RANKS
    assert [(t["model"], t["rank"]) for t in data["per_rank"]] == [("60m", 128)]
    assert data["world_sizes"] == worlds
    names = {r["optimizer"] for r in data["rows"]}
    assert set(memory.SLIMOPT) <= names and "AdamW (torch)" in names
    per_rank = data["per_rank"][0]["rows"]
    assert {r["optimizer"] for r in per_rank} == set(memory.SLIMOPT) | {"AdamW (torch)"}
    assert {len(r["state_per_rank"]) for r in per_rank} == set(worlds)
    table = (tmp_path / "memory.md").read_text()
    assert "meta device" in table and "python -m benchmarks memory --quick" in table
    assert table.count("| GrassJump |") == 2  # the size table and the per-rank table
    assert "under FSDP2: LLaMA 60m, rank 128" in table and "fsdp.plan" in table


def test_quickstart_runs(capsys):
    pytest.importorskip("transformers")
    quickstart = _load("examples/quickstart.py", "slimopt_quickstart")
    results = quickstart.main(["--steps", "3", "--seq", "32", "--batch", "4", "--rank", "8",
                               "--optimizer", "grassjump"])
    out = capsys.readouterr().out
    assert "of AdamW's optimizer-state bytes" in out
    names = [r["name"] for r in results]
    assert names == ["grassjump", "adamw"]
    assert results[0]["state_bytes"] < results[1]["state_bytes"]
    with pytest.raises(SystemExit):
        quickstart.main(["--steps", "0"])
