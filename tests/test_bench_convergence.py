"""The convergence suite (benchmarks/convergence.py): lr selection (mean over seeds) and its edge
marker, the seed policies and edge extension, the corpora and their output names, input checks,
failures recorded instead of raised, and one small end-to-end sweep through slimopt-pretrain
(whose result.json carries the loss curve)."""
import argparse
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import convergence  # noqa: E402
from benchmarks.report import stamp  # noqa: E402

#: a very small budget for slimopt-pretrain (same scale as tests/test_pretrain.py)
SMALL = ("--seq-len 32 --batch-size 4 --vocab-size 300 --max-chars 150000 --eval-batches 1 "
         "--rank 8 --update-interval 2 --warmup 1")


def _args(*argv, quick=False):
    parser = argparse.ArgumentParser()
    convergence.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.quick, args.device, args.out = quick, "cpu", None
    return args


def _row(method, lr, loss, status="ok", seed=0):
    return dict(method=method, library="slimopt", lr=lr, seed=seed, status=status, eval_loss=loss,
                eval_perplexity=None if loss is None else math.exp(loss), state_bytes=1,
                adamw_state_bytes=2, seconds=1.0, tokens=10, error=None if status == "ok"
                else "exit code 1")


def test_best_lr_is_the_minimum_and_edges_are_marked():
    runs = [_row("a", 1e-3, 5.0), _row("a", 3e-3, 4.0), _row("a", 1e-2, 4.5),  # inside
            _row("b", 1e-3, 4.2), _row("b", 3e-3, 4.4), _row("b", 1e-2, 4.9),   # low edge
            _row("c", 1e-3, 5.0), _row("c", 3e-3, 4.4), _row("c", 1e-2, 4.1),   # high edge
            # the best succeeded run is the highest *successful* lr, but a higher one diverged:
            # the optimum is bracketed, so no edge marker
            _row("d", 1e-3, 5.0), _row("d", 3e-3, 4.3), _row("d", 1e-2, None, "failed"),
            _row("e", 1e-3, float("nan")), _row("e", 3e-3, None, "failed"),     # all failed
            _row("f", 3e-3, 4.6)]                                              # one lr
    best = convergence.select_best(runs)
    assert [best[m]["best_lr"] for m in "abcdf"] == [3e-3, 1e-3, 1e-2, 3e-3, 3e-3]
    assert [best[m]["edge"] for m in "abcdf"] == [None, "low", "high", None, None]
    assert best["d"]["failed"] == [{"lr": 1e-2, "seed": 0, "error": "exit code 1"}]
    assert best["e"]["status"] == "failed"
    assert convergence.lr_cell(best["b"]) == "0.001 ↓edge"
    assert convergence.lr_cell(best["c"]) == "0.01 ↑edge"
    assert convergence.lr_cell(best["f"]) == "0.003 (no sweep)"
    best["adamw"] = dict(best["a"], library="torch")
    settings = dict(preset="tiny", params=1, corpus="c", vocab=300, steps=2, batch_size=1,
                    seq_len=2, warmup=0, min_lr_ratio=0.1, rank=2, update_interval=1,
                    eval_batches=1, eval_every=1, device="cpu", jobs=1, threads=1,
                    tokens_per_run=4)
    text = convergence.table(best, settings)
    lines = [line for line in text.splitlines() if line.startswith("| ")][1:]
    assert [line.split(" | ")[0][2:] for line in lines] == ["a", "adamw", "c", "b", "d", "f",
                                                            "e"]  # by eval loss, failed last
    assert "| b | slimopt | 0.001 ↓edge | 4.2000 | - | 66.7 | 1.050 | 1 (50%) | 1 |" in text
    assert "| e | slimopt | all failed |" in text and "d lr 0.01 seed 0 (exit code 1)" in text
    assert "- c: 0.001: 5.0000 · 0.003: 4.4000 · 0.01: 4.1000*" in text
    assert "- d: 0.001: 5.0000 · 0.003: 4.3000* · 0.01: failed" in text
    assert ("Seed 0 (initial weights, data order and the slimopt optimizers' random draws); "
            "one run per (method, lr)") in text


def test_two_seeds_mean_and_spread():
    """Best lr by the mean over the seeds that ran at every lr; the table gives that mean and
    ± half the seeds' range; an lr that failed on one seed is not chosen."""
    runs = [_row("a", 1e-3, 4.0, seed=0), _row("a", 1e-3, 4.4, seed=1),  # mean 4.2
            _row("a", 3e-3, 4.1, seed=0), _row("a", 3e-3, 4.2, seed=1),  # mean 4.15: best
            _row("b", 1e-3, 4.5, seed=0), _row("b", 1e-3, 4.5, seed=1),
            _row("b", 3e-3, 4.0, seed=0), _row("b", 3e-3, None, "failed", seed=1),
            # policy best: seed 1 only at seed 0's best lr; selection by seed 0 alone
            _row("c", 1e-3, 4.3, seed=0), _row("c", 3e-3, 4.2, seed=0),
            _row("c", 1e-2, 4.25, seed=0), _row("c", 3e-3, 4.4, seed=1)]
    best = convergence.select_best(runs)
    a, b, c = best["a"], best["b"], best["c"]
    assert a["best_lr"] == 3e-3 and a["seeds"] == [0, 1] and a["edge"] == "high"
    assert math.isclose(a["eval_loss"], 4.15) and math.isclose(a["eval_loss_max"], 4.2)
    assert math.isclose(a["eval_perplexity"], math.exp(4.15))
    assert convergence.spread_cell(a) == "± 0.0500 (2 seeds)"
    assert b["best_lr"] == 1e-3 and b["failed"][0]["seed"] == 1
    assert c["best_lr"] == 3e-3 and c["selection_seeds"] == [0] and c["edge"] is None
    assert math.isclose(c["eval_loss"], 4.3) and c["eval_loss_by_lr"]["0.003"]["seeds"] == 2
    assert convergence.spread_cell(dict(c, seeds=[0])) == "-"
    assert "seed policy best" in convergence.seed_note(dict(seeds=[0, 1], seed_policy="best"))
    assert "seed policy all" in convergence.seed_note(dict(seeds=[0, 1], seed_policy="all"))
    assert "- c: 0.001: 4.3000 · 0.003: 4.3000 (2)* · 0.01: 4.2500" in \
        "\n".join(convergence.sweep_lines(best))


def _fake_sweeps(loss):
    """A ``go(methods, lrs, seeds)`` that records its calls and returns rows of ``loss``."""
    calls = []

    def go(methods, lrs, seeds):
        calls.append((list(methods), {m: list(lrs[m]) for m in methods}, list(seeds)))
        return [_row(m, lr, loss(m, lr, seed), seed=seed) for m in methods for lr in lrs[m]
                for seed in seeds]
    return go, calls


def test_seed_policy_best_and_edge_extension():
    # a: optimum near 1e-2 (two rungs above the grid), b: at 3e-3 (one extension shows it),
    # c: lower is always better (still at the edge after the two extensions allowed)
    optimum = {"a": 1e-2, "b": 3e-3, "c": 1e-9}
    go, calls = _fake_sweeps(lambda m, lr, seed: 4 + abs(math.log10(lr / optimum[m]))
                             + 0.01 * seed)
    plan = dict(methods=["a", "b", "c"], lrs={m: [1e-3, 3e-3] for m in "abc"}, seeds=[0, 1],
                seed_policy="best", extend_edges=True)
    runs = convergence.campaign(plan, go)
    assert calls[0] == (["a", "b", "c"], plan["lrs"], [0])
    assert calls[1] == (["a", "b", "c"], {"a": [1e-2], "b": [1e-2], "c": [3e-4]}, [0])
    assert calls[2] == (["a", "c"], {"a": [3e-2], "c": [1e-4]}, [0])
    assert calls[3] == (["a", "b", "c"], {"a": [1e-2], "b": [3e-3], "c": [1e-4]}, [1])
    assert len(calls) == 4
    best = convergence.select_best(runs)
    assert [best[m]["edge"] for m in "abc"] == [None, None, "low"]
    assert best["a"]["seeds"] == [0, 1] and best["a"]["lrs"] == [1e-3, 3e-3, 1e-2, 3e-2]
    # policy all, no extension: one sweep, every seed
    go, calls = _fake_sweeps(lambda m, lr, seed: 4.0)
    convergence.campaign(dict(plan, seed_policy="all", extend_edges=False), go)
    assert calls == [(["a", "b", "c"], plan["lrs"], [0, 1])]
    assert convergence.beyond(3e-3, 1) == 1e-2 and convergence.beyond(1e-3, -1) == 3e-4
    assert convergence.beyond(2e-3, 1) == 3e-3 and convergence.beyond(2e-3, -1) == 1e-3


def test_corpora_seeds_and_output_names():
    plan = convergence.resolve(_args("--convergence-corpus", "stdlib", "fortunes",
                                     "--convergence-seeds", "0", "1",
                                     "--convergence-seed-policy", "best",
                                     "--convergence-extend-edges",
                                     "--convergence-pretrain-args=--max-chars 1000"))
    assert plan["corpora"] == ["stdlib", "fortunes"] and plan["seeds"] == [0, 1]
    assert plan["seed_policy"] == "best" and plan["extend_edges"]
    assert "--data" not in plan["flags"]["stdlib"]
    assert plan["flags"]["fortunes"][-4:] == ["--data", "fortunes", "--max-chars", "1000"]
    assert plan["names"] == {"stdlib": "convergence", "fortunes": "convergence-fortunes"}
    small = convergence.resolve(_args("--convergence-corpus", "fortunes",
                                      "--convergence-preset", "small"))
    assert small["names"] == {"fortunes": "convergence-fortunes-small"}
    assert small["flags"]["fortunes"][:2] == ["--preset", "small"]
    tagged = convergence.resolve(_args("--convergence-corpus", "fortunes",
                                       "--convergence-tag", "norecovery"))
    assert tagged["names"] == {"fortunes": "convergence-fortunes-norecovery"}
    default = convergence.resolve(_args())
    assert default["corpora"] == ["stdlib"] and default["seeds"] == [0]
    assert default["seed_policy"] == "all" and not default["extend_edges"]
    custom = convergence.resolve(_args("--convergence-pretrain-args=--data my.jsonl"))
    assert custom["corpora"] == ["custom"] and custom["names"] == {"custom": "convergence"}
    for argv, needle in ((("--convergence-corpus", "fortunes",
                           "--convergence-pretrain-args=--data x.txt"),
                          "name the corpus one way"),
                         (("--convergence-pretrain-args=--seed=3",), "--convergence-seeds"),
                         (("--convergence-seeds", "1", "1"), "named twice"),
                         (("--convergence-seeds", "0", "-1"), ">= 0"),
                         (("--convergence-tag", "../x"), "--convergence-tag")):
        with pytest.raises(ValueError, match=needle):
            convergence.resolve(_args(*argv))


def test_missing_fortunes_stop_the_suite_before_any_run(tmp_path, capsys, monkeypatch):
    from slimopt.launch import data
    monkeypatch.setattr(data, "FORTUNES_DIR", str(tmp_path / "absent"))
    args = _args("--convergence-corpus", "stdlib", "fortunes", "--convergence-methods", "adamw",
                 "--convergence-pretrain-args", SMALL,
                 "--convergence-cache-dir", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as err:
        convergence.run(args, str(tmp_path / "out"), {})
    assert err.value.code == 2 and "apt-get install fortunes" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_lr_grids():
    assert convergence.lr_grid(3e-3, 3) == [1e-3, 3e-3, 1e-2]
    assert convergence.lr_grid(3e-2, 3) == [1e-2, 3e-2, 1e-1]
    assert convergence.lr_grid(3e-3, 1) == [3e-3]
    assert convergence.lr_grid(1e-3, 5) == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    assert convergence.lr_grid(3e-3, 4) == [1e-3, 3e-3, 1e-2, 3e-2]  # one more rung above
    plan = convergence.resolve(_args())
    assert plan["methods"] == list(convergence.METHODS) and "adamw-fused" not in plan["methods"]
    assert plan["lrs"]["snsm"] == [1e-2, 3e-2, 1e-1, 3e-1]
    assert plan["lrs"]["muon"] == [1e-3, 3e-3, 1e-2, 3e-2]
    quick = convergence.resolve(_args(quick=True))
    assert quick["preset"] == "tiny" and all(len(v) == 1 for v in quick["lrs"].values())


def test_bad_methods_and_lrs_are_refused_before_running(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown method.*'sgdw'.*known: grasswalk"):
        convergence.resolve(_args("--convergence-methods", "adamw", "sgdw"))
    with pytest.raises(ValueError, match="not a finite number"):
        convergence.resolve(_args("--convergence-lrs", "nan"))
    with pytest.raises(ValueError, match="not a finite number"):
        convergence.sweep(["adamw"], {"adamw": [-1.0]}, [], str(tmp_path))
    with pytest.raises(SystemExit) as err:  # the CLI path: one line, exit code 2, nothing run
        convergence.run(_args("--convergence-methods", "sgdw"), str(tmp_path), {})
    assert err.value.code == 2 and "unknown method" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_dead_or_diverged_run_is_recorded_not_raised(tmp_path):
    class DeadWorker:
        def train(self, argv, log, timeout):
            with open(log, "w") as f:
                f.write("loading\nFatal Python error: Segmentation fault\n")
            return None, "the training process died (exit code -11)"

    row = convergence.train_one("adamw", 1e-3, [], str(tmp_path / "run"), DeadWorker())
    assert row["status"] == "failed" and "died" in row["error"]
    assert "Segmentation fault" in row["log_tail"]
    # a real worker process that hangs, then one that dies: timed out / died, both recorded
    for code, timeout, needle in (("time.sleep(60)", 0.5, "timed out after 0.5 s"),
                                  ("sys.exit(3)", 30, "died (exit code 3)")):
        runner = convergence.Worker.__new__(convergence.Worker)
        runner.log, runner.ready = str(tmp_path / "worker.log"), True
        runner.proc = subprocess.Popen(
            [sys.executable, "-c", f"import sys, time; sys.stdin.readline(); {code}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        row = convergence.train_one("adamw", 1e-3, [], str(tmp_path / "hang"), runner,
                                    timeout)
        assert row["status"] == "failed" and needle in row["error"], row["error"]
        assert not runner.ready and runner.proc.poll() is not None
    nan_curve = {"eval_loss": 5.0, "curve": [{"step": 2, "train_loss": float("nan"),
                                              "eval_loss": 5.0}]}
    assert "non-finite train_loss" in convergence.check_result(nan_curve)
    assert "non-finite final eval loss" in convergence.check_result({"eval_loss": float("inf")})
    assert convergence.check_result({"eval_loss": 5.0, "curve": []}) is None


def test_small_sweep_end_to_end(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    work = tmp_path / "work"
    args = _args("--convergence-methods", "adamw", "grassjump",
                 "--convergence-lrs", "3e-3", "1e30",  # 1e30 diverges: recorded as failed
                 "--convergence-steps", "4", "--convergence-eval-every", "2",
                 "--convergence-seeds", "0", "1", "--convergence-seed-policy", "best",
                 "--convergence-pretrain-args", SMALL, "--convergence-jobs", "2",
                 "--convergence-cache-dir", str(tmp_path / "cache"),
                 "--convergence-work-dir", str(work))
    paths = convergence.run(args, str(tmp_path), stamp("cpu", ["convergence"]))
    assert sorted(os.path.basename(p) for p in paths) == ["convergence.json", "convergence.md",
                                                         "convergence.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)

    def no_nan(token):
        raise AssertionError(f"{token} in the JSON")

    with open(tmp_path / "convergence.json") as f:
        data = json.load(f, parse_constant=no_nan)["data"]
    runs = {(r["method"], r["lr"], r["seed"]): r for r in data["runs"]}
    assert sorted(runs) == sorted([(m, lr, 0) for m in ("adamw", "grassjump")
                                   for lr in (3e-3, 1e30)] + [("adamw", 3e-3, 1),
                                                              ("grassjump", 3e-3, 1)])
    for method in ("adamw", "grassjump"):
        ok, bad = runs[(method, 3e-3, 0)], runs[(method, 1e30, 0)]
        other = runs[(method, 3e-3, 1)]  # another seed: other weights and batches
        assert other["status"] == "ok" and other["eval_loss"] != ok["eval_loss"]
        assert ok["status"] == "ok", ok.get("log_tail")
        steps = [p["step"] for p in ok["curve"]]
        tokens = [p["tokens"] for p in ok["curve"]]
        assert steps == [2, 4] and tokens == [2 * 4 * 32, 4 * 4 * 32]
        assert all(math.isfinite(p["eval_loss"]) and math.isfinite(p["train_loss"])
                   for p in ok["curve"])
        assert ok["curve"][-1]["eval_loss"] == ok["eval_loss"]
        assert bad["status"] == "failed" and bad["error"] and bad["log_tail"] is not None
        best = data["best"][method]
        assert best["best_lr"] == 3e-3 and best["edge"] == "low" and best["seeds"] == [0, 1]
        assert math.isclose(best["eval_loss"], (ok["eval_loss"] + other["eval_loss"]) / 2)
    # the curve in slimopt-pretrain's own result.json: one entry per evaluation
    folder = os.path.dirname(runs[("adamw", 3e-3, 0)]["log"])
    with open(os.path.join(folder, "result.json")) as f:
        result = json.load(f)
    assert [p["step"] for p in result["curve"]] == [2, 4]
    assert set(result["curve"][0]) == {"step", "tokens", "train_loss", "eval_loss"}
    assert not [n for n in os.listdir(folder) if n.endswith(".pt")]  # checkpoints removed
    table = (tmp_path / "convergence.md").read_text()
    assert "| adamw | torch | 0.003 ↓edge |" in table and "grassjump lr 1e+30 seed 0" in table
    assert "(2 seeds) |" in table and "seed policy best" in table
    assert "Added to every run: `--seq-len 32 --batch-size 4" in table


def _piece(tmp_path, name, runs, **settings):
    base = dict(preset="tiny", steps=200, batch_size=16, seq_len=128, warmup=20, min_lr_ratio=0.1,
                rank=32, update_interval=50, eval_every=25, eval_batches=8, max_chars=4000000,
                corpus="stdlib-x-4000000", vocab=2048, device="cpu", params=1000, jobs=2,
                threads=1, tokens_per_run=409600)
    base.update(settings)
    rows = [dict(method=m, library="slimopt", lr=lr, eval_loss=loss, status="ok", seconds=1.0,
                 curve=[dict(step=200, tokens=409600, eval_loss=loss)], **extra)
            for m, lr, loss, extra in runs]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(dict(command=f"python -m benchmarks convergence # {name}",
                                    commit="abc1234", data=dict(settings=base, runs=rows))))
    return str(path)


def test_merge_pools_pieces_and_selects_like_the_suite(tmp_path):
    from benchmarks import convergence_merge
    grid = _piece(tmp_path, "grid", [("adamw", 1e-3, 5.0, {}), ("adamw", 3e-3, 4.0, {}),
                                     ("grassjump", 1e-3, 4.5, {}), ("grassjump", 3e-3, 4.8, {})])
    seed1 = _piece(tmp_path, "seed1", [("adamw", 3e-3, 4.2, dict(seed=1)),
                                       ("grassjump", 1e-3, 4.7, dict(seed=1))])
    out = tmp_path / "out"
    assert convergence_merge.main([grid, seed1, "--out", str(out), "--name", "pooled"]) == 0
    data = json.loads((out / "pooled.json").read_text())["data"]
    assert data["best"]["adamw"]["best_lr"] == 3e-3
    assert data["best"]["adamw"]["eval_loss"] == pytest.approx(4.1)
    assert data["best"]["grassjump"]["seeds"] == [0, 1]
    text = (out / "pooled.md").read_text()
    assert "± 0.1000 (2 seeds)" in text and "# seed1" in text and "pooled from several" in text


def test_merge_refuses_unlike_pieces_and_twice_the_same_run(tmp_path, capsys):
    from benchmarks import convergence_merge
    a = _piece(tmp_path, "a", [("adamw", 1e-3, 5.0, {})])
    b = _piece(tmp_path, "b", [("adamw", 3e-3, 4.0, {})], steps=400)
    c = _piece(tmp_path, "c", [("adamw", 1e-3, 4.9, {})])
    assert convergence_merge.main([a, b, "--out", str(tmp_path)]) == 2
    assert "differ in steps (400 vs 200)" in capsys.readouterr().err
    assert convergence_merge.main([a, c, "--out", str(tmp_path)]) == 2
    assert "adamw lr 0.001 seed 0 is in both" in capsys.readouterr().err


def test_merge_renames_a_pieces_method(tmp_path, capsys):
    from benchmarks import convergence_merge
    a = _piece(tmp_path, "a", [("grassjump", 1e-3, 5.0, {})])
    b = _piece(tmp_path, "b", [("grassjump", 1e-3, 4.0, {})])
    out = tmp_path / "out"
    assert convergence_merge.main([a, b + ":grassjump=grassjump-variant", "--out", str(out)]) == 0
    best = json.loads((out / "convergence.json").read_text())["data"]["best"]
    assert best["grassjump"]["eval_loss"] == 5.0 and best["grassjump-variant"]["eval_loss"] == 4.0
    assert convergence_merge.main([a, b + ":sara=x", "--out", str(out)]) == 2
    assert "no method 'sara'" in capsys.readouterr().err
