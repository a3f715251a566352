"""The peak-memory benchmark (benchmarks/peak.py): its pure parts in the default suite (the
activation formula against hand numbers and against the tensors autograd really saves, the
computed rows, the ratios and the tables), and ``python -m benchmarks peak --quick`` under the
``bench`` marker."""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

transformers = pytest.importorskip("transformers")
from benchmarks import peak  # noqa: E402
from test_benchmarks_quick import run_quick  # noqa: E402


def test_activation_formula_hand_numbers():
    # h=4, i=8, heads=2, L=3, V=10, T=5
    # fp32: per layer 5 (4 (40 + 32) + 8 + 8) = 1520; outside 5 (40 + 16) + 2.5*4*4*5 = 480;
    # logits and their gradient 2*5*10*4 = 400
    assert peak.activation_bytes(4, 8, 2, 3, 10, 5, 4) == 3 * 1520 + 480 + 400
    # checkpointing: 3 layer inputs (5*4*4 each) and one layer recomputed
    assert peak.activation_bytes(4, 8, 2, 3, 10, 5, 4, checkpointing=True) == \
        3 * 80 + 1520 + 480 + 400
    # bf16: per layer 5 (2*72 + 8 + 8 + 4*4) = 880 (the norms' float32 upcast), outside
    # 5*56 + 2.5*2*4*5 = 380
    assert peak.activation_bytes(4, 8, 2, 3, 10, 5, 2) == 3 * 880 + 380 + 400


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd saves in one forward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_matches_saved_tensors(dtype):
    """The formula (less the logits' term, which autograd does not save) against the storages
    autograd saves for a LlamaForCausalLM of another shape than the one it was read from."""
    h, i, heads, layers, vocab, tokens = 96, 264, 3, 3, 640, 48
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=h, intermediate_size=i,
                                      num_attention_heads=heads, num_key_value_heads=heads,
                                      num_hidden_layers=layers, use_cache=False,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    ids = torch.randint(0, vocab, (1, tokens))
    elem = torch.tensor([], dtype=dtype).element_size()
    formula = peak.activation_bytes(h, i, heads, layers, vocab, tokens, elem) \
        - 2 * tokens * vocab * 4
    saved = _saved_bytes(model, ids)
    assert abs(formula - saved) / saved < 0.03, (formula, saved)


def test_computed_row_totals():
    row = peak.computed_row("x", weights=10, grads=20, state=5, act=7, act_ckpt=2, key="k")
    assert row["total"] == 42 and row["total_ckpt"] == 37 and row["key"] == "k"


def _row(config, peak_rss, imports, state, status="ok", **extra):
    return dict(extra, config=config, status=status, label=peak.label(config, "int8"),
                peak_rss=peak_rss, rss_imports=imports, state_bytes=state, seconds=3.0)


def _data(rows, preset="350m"):
    return dict(settings=dict(preset=preset, batch=1, seq_len=256, steps=2, device="cpu",
                              threads=2), params=368_000_000, malloc_note="glibc's defaults",
                rows=rows)


def test_ratios_and_tables():
    g = 2**30
    rows = [_row("adamw", 6 * g, g // 2, 3 * g),
            _row("grassjump", 4 * g, g // 2, g),
            _row("grassjump-lean", 2.4 * g, g // 2, g // 4),
            dict(config="galore-torch-8bit-layerwise", status="n/a",
                 label=peak.label("galore-torch-8bit-layerwise"), reason="CUDA only: because"),
            dict(config="adamw8bit-torchao", status="failed", label="AdamW8bit (torchao)",
                 reason="exit code 1: boom")]
    peak.ratios(rows)
    assert rows[0]["vs_adamw"] == 1.0 and rows[2]["vs_adamw"] == pytest.approx(0.4)
    assert rows[2]["train_vs_adamw"] == pytest.approx(1.9 / 5.5)
    assert peak.leanest(rows)["config"] == "grassjump-lean"
    text = peak.markdown(_data(rows))
    assert "| GrassJump lean (in-backward + int8 states) | 2.40 GiB | 0.40 |" in text
    assert "| AdamW (torch, foreach=False) | 6.00 GiB | 1.00 | 5.50 GiB | 1.00 |" in text
    assert "n/a: CUDA only: because" in text and "failed: exit code 1: boom" in text
    assert "**0.40x** torch AdamW's" in text and "**met**" in text
    rows[2]["peak_rss"] = 3 * g
    peak.ratios(rows)
    assert "**not met**" in peak.markdown(_data(rows))
    assert "stated for LLaMA 350m" in peak.markdown(_data(rows, preset="small"))


def test_computed_markdown():
    r = peak.computed_row("AdamW, fp32 weights", 4 * 10**9, 4 * 10**9, 8 * 10**9,
                          10**9, 2 * 10**8)
    lean = peak.computed_row("GrassJump lean (in-backward + int8)", 2 * 10**9, 10**8,
                             10**9, 2 * 10**8, 2 * 10**8, key="grassjump", fits=True,
                             total_ckpt_accumulation=5 * 10**9, fits_accumulation=False)
    comp = dict(tokens=256, sizes={"1b": dict(rank=512, params=10**9, rows=[r])},
                recipe_7b=dict(rank=1024, rows=[lean]))
    text = "\n".join(peak.computed_markdown(comp))
    assert "| AdamW, fp32 weights | 4.0 GB | 4.0 GB | 8.0 GB | 1.0 GB (0.2 GB) | 17.0 GB | " \
           "16.2 GB |" in text
    assert "## Computed, 1B and 7B" in text
    assert "(computed, `accumulation_steps=1`): GrassJump lean" in text
    assert "| 3.3 GB | yes | 5.0 GB | no |" in text


def test_configs_and_labels():
    configs = peak.all_configs()
    assert configs[0] == "adamw"
    for name in peak.slimopt_names():
        assert name in configs and name + "-lean" in configs
    assert set(peak.PEERS) <= set(configs)
    assert peak.label("grassjump-lean", "float32") == "GrassJump lean (in-backward)"


def test_unknown_config_refused():
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    peak.add_arguments(parser)
    with pytest.raises(SystemExit, match="unknown configuration"):
        peak.settings(parser.parse_args(["--peak-configs", "nope"]))
    s = peak.settings(parser.parse_args(["--quick", "--peak-configs", "grassjump"]))
    assert s["configs"] == ["adamw", "grassjump"] and s["preset"] == peak.QUICK_PRESET


@pytest.mark.bench
@pytest.mark.timeout(900)
def test_peak_quick(tmp_path):
    folder, elapsed = run_quick("peak", tmp_path, ["peak"])
    data = json.loads((folder / "peak.json").read_text())
    assert data["command"].startswith("python -m benchmarks peak --quick")
    rows = {r["config"]: r for r in data["data"]["rows"]}
    assert set(rows) == set(peak.QUICK_CONFIGS)
    assert rows["adamw"]["status"] == "ok" and rows["adamw"]["vs_adamw"] == 1.0
    for r in rows.values():
        assert r["status"] in ("ok", "n/a", "failed")
        if r["status"] != "ok":
            assert r["reason"]
            continue
        assert r["peak_rss"] > r["rss_imports"] > 0 and r["state_bytes"] > 0
        assert r["peak_rss"] >= r["weight_bytes"]
    # the lean run holds no full gradients and a quarter of the state: its training part (the
    # peak above the imports; its total also carries bitsandbytes' import) is the smaller
    assert rows["grassjump-lean"]["train_peak"] <= rows["grassjump"]["train_peak"]
    assert rows["grassjump-lean"]["state_bytes"] < rows["grassjump"]["state_bytes"]
    text = (folder / "peak.md").read_text()
    assert text.startswith("Command: `python -m benchmarks peak --quick")
    assert "## Computed, 1B and 7B" in text and "LLaMA-7B on a 24 GB GPU" in text
    print(f"python -m benchmarks peak --quick: {elapsed:.0f} s")


def test_merge_keeps_each_runs_ratios(tmp_path):
    g = 2**30
    s = dict(preset="350m", steps=2, batch=1, seq_len=256, threads=2, rank=256, malloc="mmap",
             device="cpu", configs=["adamw", "grassjump", "root"])
    earlier = dict(command="python -m benchmarks peak A", commit="abc", time="t1",
                   data=dict(settings=s, rows=[_row("adamw", 6 * g, g // 2, 3 * g),
                                               _row("grassjump", 4 * g, g // 2, g)]))
    path = tmp_path / "peak.json"
    path.write_text(json.dumps(earlier))
    runs, rows = peak.earlier_runs(str(path), s)
    assert [r["run"] for r in rows] == [1, 1, 1] and runs[0]["commit"] == "abc"
    assert rows[2]["config"] == "root" and rows[2]["status"] == "not run"
    del rows[2]
    rows += [dict(_row("adamw", 5 * g, g // 2, 3 * g), run=2),
             dict(_row("grassjump-lean", 2 * g, g // 2, g // 4), run=2)]
    peak.ratios(rows)
    assert rows[1]["vs_adamw"] == pytest.approx(4 / 6)
    assert rows[3]["vs_adamw"] == pytest.approx(2 / 5)
    data = dict(_data(rows), runs=runs + [dict(command="B", commit="def", time="t2")])
    text = peak.markdown(data)
    assert "- run 1: `python -m benchmarks peak A` · commit `abc`" in text
    assert "| GrassJump lean (in-backward + int8 states) | 2 | 2.00 GiB | 0.40 |" in text
    with pytest.raises(SystemExit, match="settings differ"):
        peak.earlier_runs(str(path), dict(s, preset="60m"))


def test_a_stopped_runs_gap_measured_by_a_later_run_is_not_listed_as_not_run():
    g = 2**30
    rows = [dict(_row("adamw", 6 * g, g // 2, 3 * g), run=1),
            dict(config="root", status="not run", label="ROOT", run=1, reason="stopped"),
            dict(config="sara", status="not run", label="SARA", run=1, reason="stopped"),
            dict(_row("root", 4 * g, g // 2, g), run=2)]
    kept = peak.measured_where_stopped(rows)
    assert [(r["config"], r["status"]) for r in kept] == [
        ("adamw", "ok"), ("sara", "not run"), ("root", "ok")]


def test_merge_only_writes_the_merged_runs(tmp_path):
    from benchmarks.report import stamp
    g = 2**30
    s = dict(preset="350m", steps=2, batch=1, seq_len=256, threads=2, rank=256, malloc="mmap",
             device="cpu")
    for name, rows in (("a", [_row("adamw", 6 * g, g // 2, 3 * g)]),
                       ("b", [_row("adamw", 5 * g, g // 2, 3 * g),
                              _row("snsm-lean", 2 * g, g // 2, g // 8)])):
        (tmp_path / f"{name}.json").write_text(json.dumps(dict(
            command=f"python -m benchmarks peak {name}", commit=name, time="t",
            data=dict(settings=s, rows=rows))))
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    peak.add_arguments(parser)
    args = parser.parse_args(["--peak-no-computed", "--peak-merge-only", "--peak-merge",
                              str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    paths = peak.run(args, str(tmp_path), stamp("cpu", ["peak", "--peak-merge-only"]))
    data = json.loads((tmp_path / "peak.json").read_text())["data"]
    assert [r["run"] for r in data["rows"]] == [1, 2, 2] and len(data["runs"]) == 2
    assert data["rows"][2]["vs_adamw"] == pytest.approx(0.4)
    assert any(p.endswith("peak.png") for p in paths)
    with pytest.raises(SystemExit, match="needs --peak-merge"):
        peak.settings(parser.parse_args(["--peak-merge-only"]))


def test_checkpointing_configs():
    g = 2**30
    assert peak.label("grassjump-lean-ckpt", "int8") == \
        "GrassJump lean (in-backward + int8 states) + activation checkpointing"
    rows = [_row("adamw", 6 * g, g // 2, 3 * g), _row("adamw-ckpt", 5.9 * g, g // 2, 3 * g),
            _row("grassjump-lean", 2.8 * g, g // 2, g // 4),
            _row("grassjump-lean-ckpt", 2.4 * g, g // 2, g // 4)]
    peak.ratios(rows)
    assert peak.leanest(rows)["config"] == "grassjump-lean-ckpt"
    assert peak.leanest(rows, checkpointing=False)["config"] == "grassjump-lean"
    text = peak.markdown(_data(rows))
    assert "without activation checkpointing: **GrassJump lean (in-backward + int8 states)**" \
        in text and "**0.47x**" in text and "**0.40x**" in text
