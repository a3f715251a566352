"""slimopt-pretrain's memory flags (``--grad-accum``, ``--activation-checkpointing``,
``--step-in-backward``, ``--state-dtype``): each trains what the plain run trains (up to float
rounding) where the maths is the same, each resumes exactly, the logged gradient norm is the real
one, and what cannot work is refused in one line."""
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
import test_pretrain_contract as contract  # noqa: E402  (its small run and its refusal check)

SMALL = contract.SMALL + ["--steps", "8", "--grad-clip", "0"]
_fails = contract._refused
cache = contract.cache  # the module's token cache fixture
#: each flag, with the plain run's maths (equal up to float rounding) or not
FLAGS = {
    "grad-accum": (["--grad-accum", "2"], True),
    "grad-accum-4": (["--grad-accum", "4"], True),
    "activation-checkpointing": (["--activation-checkpointing"], True),
    "step-in-backward": (["--step-in-backward"], True),
    "step-in-backward-accum": (["--step-in-backward", "--grad-accum", "2",
                                "--activation-checkpointing"], True),
    "state-dtype-bfloat16": (["--state-dtype", "bfloat16"], False),
    "state-dtype-int8": (["--state-dtype", "int8"], False),
}
#: float rounding through 8 GrassWalk steps (another summation order of the gradient, float32
#: weights of size <= 1): measured at most 1.7e-7 (printed on failure); any change of the rule
#: moves an entry by a step, at least the first warmup step's lr (3e-3 / 20 = 1.5e-4)
ROUNDING = 1e-5


@pytest.fixture(scope="module")
def plain(tmp_path_factory, cache):
    """The run without any of the flags: its result and final weights."""
    out = tmp_path_factory.mktemp("plain")
    result = pretrain.execute(SMALL + ["--cache-dir", cache, "--output-dir", str(out)])
    return result, _weights(out / "checkpoint-8.pt")


def _run(args, out, cache):
    return pretrain.execute(SMALL + ["--cache-dir", cache, "--output-dir", str(out)] + args)


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("name", list(FLAGS))
def test_flag_trains_as_the_plain_run_and_resumes_exactly(tmp_path, cache, plain, name):
    flags, same_maths = FLAGS[name]
    straight = _run(flags, tmp_path / "a", cache)
    _run(flags + ["--save-every", "3", "--halt-after", "5"], tmp_path / "b", cache)
    resumed = _run(flags + ["--resume", str(tmp_path / "b" / "checkpoint-3.pt")],
                   tmp_path / "b", cache)
    a, b = _weights(tmp_path / "a" / "checkpoint-8.pt"), _weights(tmp_path / "b" /
                                                                  "checkpoint-8.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["curve"][-1] == straight["curve"][-1]
    settings = torch.load(tmp_path / "a" / "checkpoint-8.pt", weights_only=True)["args"]
    assert settings["grad_accum"] == (int(flags[flags.index("--grad-accum") + 1])
                                      if "--grad-accum" in flags else 1)
    assert settings["step_in_backward"] == ("--step-in-backward" in flags)
    assert settings["activation_checkpointing"] == ("--activation-checkpointing" in flags)
    assert settings["state_dtype"] == (flags[1] if "--state-dtype" in flags else "float32")
    reference, weights = plain
    diff = max(float((a[k].float() - weights[k].float()).abs().max()) for k in a)
    if same_maths:
        print(f"{name}: largest weight difference from the plain run {diff:.3g}")
        assert diff <= ROUNDING, diff
        assert straight["eval_loss"] == pytest.approx(reference["eval_loss"], abs=1e-4)
    else:
        assert diff > 0  # int8 moments: another run, which still trains
        assert straight["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-2)


def test_logged_grad_norm_is_the_global_pre_clip_norm(tmp_path, cache):
    """--step-in-backward's gradient norm (summed in the hooks) is the number plain_step's
    clip_grad_norm_ reports at the same step, with clipping on."""
    from slimopt.launch.run_setup import build_run
    from slimopt.launch.train_step import InBackwardStep, plain_step, rank_rows
    norms = []
    for flags, step_for in (([], lambda run: plain_step),
                            (["--step-in-backward", "--grad-accum", "2"], InBackwardStep)):
        args = pretrain.parse_args(SMALL + ["--cache-dir", cache, "--grad-clip", "0.5",
                                            "--output-dir", str(tmp_path / "n")] + flags)
        run = build_run(args, 0, 1, torch.device("cpu"))
        step = step_for(run)
        norms.append([float(step(run, rank_rows(run, s), s)[1]) for s in range(2)])
    assert norms[0][0] > 0.5  # the clip is active
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_activation_checkpointing_recomputes_and_gives_the_same_gradients(monkeypatch):
    import transformers
    from transformers.models.llama import modeling_llama
    from slimopt.launch.presets import llama_config
    from slimopt.launch.run_setup import checkpoint_activations
    calls, mlp = [], modeling_llama.LlamaMLP.forward
    # counted in the method: torch runs the recomputation without module hooks
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward",
                        lambda self, x: calls.append(1) or mlp(self, x))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama_config("tiny", 300, 32))
        if checkpointing:
            checkpoint_activations(model)
        calls.clear()
        ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        layers = len(model.model.layers)
        assert len(calls) == (2 * layers if checkpointing else layers)  # recomputed in backward
        grads.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for g, h in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)


def test_bad_input_is_one_line(tmp_path, cache, plain, capsys):
    base = SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "x")]
    _fails(base + ["--grad-accum", "0"], capsys, "--grad-accum must be >= 1")
    _fails(base + ["--grad-accum", "3"], capsys, "not divisible", "--grad-accum 3",
           "multiple of 3")
    _fails(base + ["--optimizer", "adamw", "--step-in-backward"], capsys, "--step-in-backward",
           "peer", "grasswalk")
    _fails(base + ["--optimizer", "adamw", "--state-dtype", "int8"], capsys, "--state-dtype",
           "peer", "grasswalk")
    _fails(base + ["--state-dtype", "fp8"], capsys, "--state-dtype", "int8")
    _fails(base + ["--state-dtype", "int8", "--opt-args", '{"state_dtype": "bfloat16"}'],
           capsys, "--opt-args sets state_dtype")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_accumulation_steps": 2}))
    _fails(base + ["--deepspeed", str(ds), "--step-in-backward"], capsys, "--deepspeed")


def test_zero_refuses_low_precision_states_in_one_line(tmp_path, cache, capsys):
    pytest.importorskip("deepspeed")
    ds = tmp_path / "z2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    _fails(SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "x"), "--deepspeed",
                    str(ds), "--state-dtype", "bfloat16"], capsys, "--deepspeed", "ZeRO-2",
           "state_dtype='float32' there")


def test_resume_refuses_another_state_dtype_and_applies_another_grad_accum(
        tmp_path, cache, capsys):
    _run(["--save-every", "4", "--halt-after", "4"], tmp_path / "r", cache)
    checkpoint = str(tmp_path / "r" / "checkpoint-4.pt")
    base = SMALL + ["--cache-dir", cache, "--output-dir", str(tmp_path / "r")]
    capsys.readouterr()
    _fails(base + ["--state-dtype", "int8", "--resume", checkpoint], capsys, "state_dtype",
           "'float32'", "'int8'")
    _run(["--grad-accum", "2", "--step-in-backward", "--resume", checkpoint], tmp_path / "r",
         cache)
    out = capsys.readouterr().out
    assert "--grad-accum changed from 1 to 2: applied" in out
    assert "--step-in-backward changed from False to True: applied" in out


def test_state_dtype_reaches_the_optimizer(tmp_path, cache):
    from slimopt.launch.run_setup import build_run
    for flags, expected in (([], "float32"), (["--state-dtype", "int8"], "int8"),
                            (["--opt-args", '{"state_dtype": "bfloat16"}'], "bfloat16")):
        args = pretrain.parse_args(SMALL + ["--cache-dir", cache,
                                            "--output-dir", str(tmp_path / "s")] + flags)
        assert build_run(args, 0, 1, torch.device("cpu")).opt.state_dtype == expected


def test_deepspeed_takes_grad_accum(tmp_path):
    """--grad-accum is DeepSpeed's gradient_accumulation_steps; a JSON that sets another one is
    refused (the config is read before DeepSpeed is imported)."""
    from slimopt.launch.deepspeed_config import load_deepspeed_config
    from slimopt.launch.train_config import UsageError
    cfg = tmp_path / "ds.json"
    cfg.write_text("{}")
    args = pretrain.parse_args(SMALL + ["--deepspeed", str(cfg), "--grad-accum", "2",
                                        "--output-dir", os.devnull])
    loaded = load_deepspeed_config(args, 1)
    assert loaded["gradient_accumulation_steps"] == 2
    assert loaded["train_micro_batch_size_per_gpu"] == 2
    cfg.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    with pytest.raises(UsageError, match="gradient_accumulation_steps 4 but --grad-accum is 2"):
        load_deepspeed_config(args, 1)
    args = pretrain.parse_args(SMALL + ["--deepspeed", str(cfg), "--output-dir", os.devnull])
    load_deepspeed_config(args, 1)
    assert args.grad_accum == 4  # recorded in the checkpoint settings


@pytest.mark.slow
def test_two_ranks_step_in_backward_with_accumulation_matches_one_process(tmp_path, cache):
    """DDP: --step-in-backward --grad-accum 2 on 2 CPU ranks (the DDP communication hook, the
    first micro-batch under no_sync) trains what one process trains."""
    flags = ["--step-in-backward", "--grad-accum", "2"]
    single = _run(flags, tmp_path / "one", cache)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "slimopt.launch.pretrain", *SMALL, *flags,
           "--cache-dir", cache, "--output-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)
