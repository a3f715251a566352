"""The memory benchmark's counts cross-checked against galore-torch, and the quickstart runs."""
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


def test_memory_counts_on_meta_match_the_shapes(tmp_path):
    pytest.importorskip("transformers")
    memory = _load("benchmarks/memory.py", "slimopt_bench_memory")
    rows = memory.main(["--sizes", "60m", "--ranks", "128", "512", "--out", str(tmp_path)])
    got = {(r["optimizer"], r["rank"]): r["bytes"] for r in rows}
    hidden, inter, _, layers = memory.LLAMA_SHAPES["60m"]
    n = rows[0]["params"]
    assert got[("AdamW (torch)", None)] == 8 * n + 4 * (9 * layers + 3)  # + a step per tensor
    # rank 128: per layer 4 (hidden x hidden) and 3 (hidden x inter) projections
    low = 4 * (2 * 128 * hidden + hidden * 128) + 3 * (2 * 128 * inter + hidden * 128)
    low_params = (4 * hidden * hidden + 3 * hidden * inter) * layers
    dense = n - low_params
    assert got[("GrassWalk", 128)] == 4 * (2 * dense + layers * low)
    no_basis = 4 * (2 * dense + layers * (4 * 2 * 128 * hidden + 3 * 2 * 128 * inter))
    assert got[("GrassJump", 128)] == no_basis
    if got.get(("GaLoreAdamW (galore-torch)", 128)) is not None:
        assert got[("GaLore (slimopt)", 128)] == got[("GaLoreAdamW (galore-torch)", 128)]
    # rank 512 = hidden: slimopt falls back to dense AdamW; galore-torch holds more than AdamW
    assert got[("GrassWalk", 512)] == 8 * n
    assert (tmp_path / "memory.md").read_text().count("| GrassJump |") == 2


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
