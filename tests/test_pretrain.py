"""slimopt-pretrain: resume without data loss, bad input, a 2-rank CPU run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from net import free_port

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from slimopt.launch import pretrain  # noqa: E402

SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
         "--max-chars", "150000", "--eval-every", "4", "--eval-batches", "1", "--no-progress",
         "--steps", "8", "--rank", "8", "--update-interval", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _run(args, tmp_path, cache, name):
    out = tmp_path / name
    result = pretrain.execute(SMALL + ["--cache-dir", cache, "--output-dir", str(out)] + args)
    return result, out


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("optimizer", ["grassjump", "adamw"])
def test_killed_and_resumed_run_matches_the_uninterrupted_one(tmp_path, cache, optimizer):
    straight, out_a = _run(["--optimizer", optimizer], tmp_path, cache, "a")
    _, out_b = _run(["--optimizer", optimizer, "--save-every", "3", "--halt-after", "5"],
                    tmp_path, cache, "b")
    assert (out_b / "checkpoint-3.pt").exists() and not (out_b / "checkpoint-6.pt").exists()
    resumed, _ = _run(["--optimizer", optimizer, "--resume", str(out_b / "checkpoint-3.pt")],
                      tmp_path, cache, "b")
    a, b = _weights(out_a / "checkpoint-8.pt"), _weights(out_b / "checkpoint-8.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["eval_loss"] == straight["eval_loss"]
    saved = json.loads((out_a / "result.json").read_text())
    assert saved["state_bytes"] < saved["adamw_state_bytes"] or optimizer == "adamw"
    if optimizer == "grassjump":
        logs = os.listdir(out_a / "tb")
        assert logs, "TensorBoard wrote nothing"


def _fails(args, capsys, needle):
    with pytest.raises(SystemExit) as err:
        pretrain.execute(args)
    assert err.value.code == 2
    assert needle in capsys.readouterr().err


def test_bad_input_is_one_clear_message(tmp_path, cache, capsys):
    base = SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "x")]
    _fails(base + ["--data", str(tmp_path / "missing.jsonl")], capsys, "no such file")
    _fails(["--preset", "huge"], capsys, "unknown preset")
    _fails(["--optimizer", "sgdw"], capsys, "unknown optimizer")
    _fails(base + ["--opt-args", "[1]"], capsys, "--opt-args")
    _fails(base + ["--steps", "0"], capsys, "--steps")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    _fails(base + ["--resume", str(corrupt)], capsys, "not a readable checkpoint")
    _run([], tmp_path, cache, "ok")
    _fails(base + ["--seq-len", "16", "--resume", str(tmp_path / "ok" / "checkpoint-8.pt")],
           capsys, "seq_len")
    _fails(base + ["--opt-args", '{"walk_angle": 9}'], capsys, "walk_angle")


def test_local_text_file(tmp_path, cache):
    data = tmp_path / "corpus.jsonl"
    with open(data, "w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"document {i}: " + "the quick brown fox " * 20}) + "\n")
    result, _ = _run(["--data", str(data), "--optimizer", "snsm", "--steps", "4"], tmp_path,
                     cache, "local")
    assert result["eval_loss"] < 6.0


def test_fortunes_corpus_parsing_and_refusal(tmp_path, cache, capsys, monkeypatch):
    """``--data fortunes``: one document per fortune (``%`` lines between them, overstrikes
    resolved, the .dat/.u8 files and the off/ folder skipped), in a fixed shuffled order; where
    the package is not installed, one line naming the fix and the alternatives."""
    from slimopt.launch import data
    root = tmp_path / "fortunes"
    (root / "off").mkdir(parents=True)
    (root / "wisdom").write_text("Be wise.\n%\nA _\bb_\bo_\bl_\bd claim.\n\t-- Someone\n%\n")
    (root / "zippy").write_text("Are we having fun yet?\n%\n")
    (root / "wisdom.dat").write_bytes(b"\0\0\x02")
    (root / "wisdom.u8").write_text("Be wise.\n%\n")
    (root / "off" / "rude").write_text("not read\n%\n")
    monkeypatch.setattr(data, "FORTUNES_DIR", str(root))
    corpus = data.open_corpus("fortunes", max_chars=10_000)
    docs = list(corpus.documents())
    assert sorted(docs) == ["A bold claim.\n\t-- Someone", "Are we having fun yet?", "Be wise."]
    assert docs == list(data.open_corpus("fortunes", max_chars=10_000).documents())  # fixed order
    assert corpus.corpus_id.startswith("fortunes-") and corpus.corpus_id.endswith("-10000")
    assert corpus.truncated is False
    cut = data.open_corpus("fortunes", max_chars=5)
    assert len(list(cut.documents())) == 1 and cut.truncated is True
    monkeypatch.setattr(data, "FORTUNES_DIR", str(tmp_path / "absent"))
    with pytest.raises(data.DataError) as err:
        data.open_corpus("fortunes")
    message = str(err.value)
    assert "\n" not in message and "apt-get install fortunes" in message
    assert "stdlib" in message and "--data PATH" in message
    _fails(SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "x"), "--data",
                    "fortunes"], capsys, "apt-get install fortunes")


def test_installed_fortunes_train(tmp_path, cache):
    from slimopt.launch import data
    if not os.path.isdir(data.FORTUNES_DIR):
        pytest.skip(f"no {data.FORTUNES_DIR} (apt-get install fortunes)")
    docs = list(data.open_corpus("fortunes", max_chars=10**9).documents())
    assert len(docs) > 10_000 and 2_000_000 < sum(map(len, docs)) < 4_000_000
    assert not any("\x08" in d or "%" in d.splitlines() for d in docs)
    result, _ = _run(["--data", "fortunes", "--optimizer", "adamw", "--steps", "4"], tmp_path,
                     cache, "fortunes")
    assert result["eval_loss"] < 6.0


def test_small_preset_size():
    """The ``small`` preset (between tiny and 60m, for the CPU convergence suite) has the size
    its comment gives: 4,212,992 parameters at vocab 2048, 4x tiny's."""
    import transformers
    from slimopt.launch.presets import llama_config
    sizes = {p: sum(t.numel() for t in transformers.LlamaForCausalLM(
        llama_config(p, 2048, 128)).parameters()) for p in ("tiny", "small")}
    assert sizes == {"tiny": 1_328_256, "small": 4_212_992}


def _two_ranks(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "slimopt.launch.pretrain", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def test_two_cpu_ranks_match_one_process(tmp_path, cache):
    common = SMALL + ["--optimizer", "grasswalk", "--no-tensorboard"]
    single = pretrain.execute(common + ["--cache-dir", cache, "--output-dir", str(tmp_path / "one")])
    # a cold cache: local rank 0 builds the tokenizer and the token shards, rank 1 reads them
    cold = tmp_path / "cold-cache"
    proc = _two_ranks(*common, "--cache-dir", str(cold), "--output-dir", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(cold.glob("tokens-*.bin"))) == 1
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    # DDP averages the two half-batch gradients: the full batch's gradient up to rounding
    assert two["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
    assert two["tokens"] == single["tokens"]


def test_a_data_failure_on_the_building_rank_reaches_every_rank(tmp_path):
    proc = _two_ranks(*SMALL, "--cache-dir", str(tmp_path / "cache"), "--data",
                      str(tmp_path / "missing.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines()
              if line.startswith("slimopt-pretrain: error:")]
    assert any("missing.jsonl" in line for line in errors), errors  # the builder's own error
    assert any("another rank" in line for line in errors), errors   # and rank 1 is told
    # torchrun prints its own traceback for a failed child; none comes from slimopt's code
    assert f"slimopt{os.sep}launch{os.sep}" not in proc.stderr


def test_deepspeed_zero2_two_ranks_resume_one_rank_and_contradictions(tmp_path, cache, capsys):
    pytest.importorskip("deepspeed")
    cfg = tmp_path / "z2.json"
    cfg.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {
        "type": "slimopt.GrassJump", "params": {"lr": 0.003, "rank": 8, "update_interval": 3}}}))
    common = SMALL + ["--cache-dir", cache, "--deepspeed", str(cfg), "--no-tensorboard",
                      "--steps", "6", "--eval-every", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")

    def torchrun(*extra, ranks=2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
               "--master_port", str(free_port()), "-m", "slimopt.launch.pretrain", *common, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    torchrun("--output-dir", str(tmp_path / "a"))
    torchrun("--output-dir", str(tmp_path / "b"), "--save-every", "3", "--halt-after", "4")
    out = torchrun("--output-dir", str(tmp_path / "b"), "--resume",
                   str(tmp_path / "b" / "deepspeed" / "step3"))
    assert "resumed from step 3" in out and "ZeRO shards it" in out
    assert "not verified" not in out  # each rank's digest file was checked
    assert sorted(p.name for p in (tmp_path / "b" / "deepspeed" / "step3").glob("slimopt-*")) \
        == ["slimopt-sha256-rank0.json", "slimopt-sha256-rank1.json"]
    a = json.loads((tmp_path / "a" / "result.json").read_text())
    b = json.loads((tmp_path / "b" / "result.json").read_text())
    assert a["eval_loss"] == b["eval_loss"]
    # the 2-rank checkpoint resumed by one process (slimopt.launch.load_resharded)
    torchrun("--output-dir", str(tmp_path / "c"), "--resume",
             str(tmp_path / "b" / "deepspeed" / "step3"), ranks=1)
    c = json.loads((tmp_path / "c" / "result.json").read_text())
    assert c["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)

    base = SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "x")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 64}))
    _fails(base + ["--deepspeed", str(bad)], capsys, "contradicts --batch-size")
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    _fails(base + ["--deepspeed", str(bad)], capsys, "name a slimopt.* optimizer")
    _fails(base + ["--deepspeed", str(cfg), "--optimizer", "root"], capsys, "but --optimizer")
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "cpu"}}}))
    _fails(base + ["--deepspeed", str(bad)], capsys, "offload_optimizer")
    _fails(base + ["--deepspeed", str(tmp_path / "none.json")], capsys, "No such file")


def test_console_script_exits_zero(tmp_path, cache):
    cmd = [sys.executable, "-m", "slimopt.launch.pretrain", *SMALL, "--steps", "2",
           "--cache-dir", cache, "--output-dir", str(tmp_path / "cli"), "--no-tensorboard"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final eval loss" in proc.stdout and "torch AdamW would hold" in proc.stdout


@pytest.mark.parametrize("optimizer,opt_args,expected", [
    ("grassjump", "{}", 3), ("sara", '{"seed": 5}', 5), ("adamw", "{}", None)])
def test_run_seed_seeds_the_optimizers_draws(optimizer, opt_args, expected):
    """--seed covers a slimopt optimizer's random subspaces (its seed option) unless --opt-args
    sets one; optimizers without a seed option are built as before."""
    import transformers
    from slimopt.launch.run_setup import make_optimizer
    args = pretrain.parse_args(["--optimizer", optimizer, "--seed", "3", "--opt-args", opt_args,
                                "--lr", "1e-3", "--output-dir", os.devnull])
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2)
    opt = make_optimizer(args, transformers.LlamaForCausalLM(cfg), None)
    assert getattr(opt, "seed", None) == expected
