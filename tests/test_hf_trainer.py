"""HF ``Trainer`` with slimopt optimizers: without DeepSpeed (checkpoint every 3 steps, resume from
checkpoint-3 equals the uninterrupted run exactly), and under DeepSpeed ZeRO-2 (one torchrun rank,
CPU, gloo): ``SlimoptTrainer`` steps slimopt's math (equal to the one-process Trainer within
float rounding), the plain ``Trainer`` (which drops the optimizer and would train AdamW,
huggingface/transformers#38753) is refused by ``slimopt.integrations.bypass`` before any weight
changes, and an ``"optimizer"`` section in the DeepSpeed config is refused."""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "distributed"))

from hf_launch import torchrun_results  # noqa: E402
from hf_common import Tokens, grasswalk, tiny_llama, training_args, weights  # noqa: E402

import transformers  # noqa: E402

from slimopt.optimizers.core.base import SlimOptimizer  # noqa: E402


def _train(tmp, steps, resume=None, save_steps=None, model=None):
    model = model or tiny_llama()
    kw = dict(save_strategy="steps", save_steps=save_steps) if save_steps else {}
    opt = grasswalk(model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp, steps, **kw),
                                   train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def test_trainer_resume_equals_uninterrupted(tmp_path):
    full, trainer = _train(tmp_path / "full", 6)
    assert isinstance(trainer.optimizer.optimizer, SlimOptimizer)
    assert any("basis" in s for s in trainer.optimizer.optimizer.state.values())
    _train(tmp_path / "cut", 6, save_steps=3)
    ckpt = tmp_path / "cut" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "scheduler.pt").exists()
    resumed, _ = _train(tmp_path / "cut", 6, resume=str(ckpt))
    a, b = weights(full), weights(resumed)
    assert max((a[n] - b[n]).abs().max().item() for n in a) == 0.0


def _torchrun(scenario, out, port=None, worker="hf_deepspeed_worker.py", ranks=1, env=()):
    """``worker`` under torchrun (``port`` is ignored: a free one is taken)."""
    return torchrun_results(worker, scenario, out, ranks, env)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same 4 steps with the plain Trainer, no DeepSpeed."""
    model, _ = _train(tmp_path_factory.mktemp("ref"), 4)
    return weights(model)


@pytest.mark.parametrize("scenario", [
    "slim", pytest.param("slim_factory", marks=pytest.mark.slow),
    pytest.param("slim_z3", marks=pytest.mark.slow)])
def test_deepspeed_zero_slimopt_trainer_steps_slimopt_math(scenario, tmp_path, one_process):
    port = {"slim": 29561, "slim_factory": 29562, "slim_z3": 29569}[scenario]
    r = _torchrun(scenario, tmp_path, port)
    assert "error" not in r, r["error"]
    zero = "DeepSpeedZeroOptimizer_Stage3" if scenario == "slim_z3" else "DeepSpeedZeroOptimizer"
    assert r["chain"] == ["DeepSpeedOptimizerWrapper", zero, "GrassWalk"]
    assert "basis" in r["state_keys"]
    # fp32 throughout; the only differences are DeepSpeed's flat-buffer gradient norm for
    # clipping and its copies, i.e. float rounding (measured: 1.2e-7). The bound is 1% of one
    # step (lr 1e-3), as in test_accelerate: an AdamW or vector-rule step would miss it by far.
    diff = max((r["weights"][n] - one_process[n]).abs().max().item() for n in one_process)
    assert diff <= 1e-5, diff


def test_deepspeed_zero2_plain_trainer_refused_before_any_update(tmp_path):
    r = _torchrun("plain", tmp_path, 29563)
    assert "error" in r and "SlimoptTrainer" in r["error"], r
    assert r["error"].startswith("RuntimeError: A GrassWalk optimizer was built on this model")
    assert r["chain"][-1] == "AdamW"   # what transformers would have trained with
    assert not r["changed"] and r["state_keys"] == []


@pytest.mark.slow
def test_deepspeed_optimizer_section_refused(tmp_path):
    r = _torchrun("slim_ds_optimizer", tmp_path, 29564)
    assert "has an \"optimizer\" section" in r.get("error", ""), r
    assert not r["changed"]


@pytest.mark.slow
def test_deepspeed_zero2_plain_trainer_unguarded_trains_adamw(tmp_path):
    """What transformers does on its own (documents the bypass the guard refuses)."""
    r = _torchrun("plain_unwatched", tmp_path, 29565)
    assert r["chain"][-1] == "AdamW" and "basis" not in r["state_keys"] and r["changed"]


@pytest.mark.slow
def test_fsdp2_slimopt_trainer_two_ranks_steps_slimopt_math(tmp_path):
    """``SlimoptTrainer`` + ``fsdp="full_shard"``, ``fsdp_config={"version": 2}`` +
    ``HFOptimizerFactory`` on 2 gloo ranks (accelerate's FSDP plugin forced on the CPU, see
    hf_trainer_fsdp_worker.py): the FSDP2 router steps; equal to the one-process Trainer with the
    same global batch (4) within float rounding (measured 1.5e-6)."""
    import slimopt
    results = _torchrun("slim", tmp_path, 29566, worker="hf_trainer_fsdp_worker.py", ranks=2)
    for r in results:
        assert r["distributed_type"] == "DistributedType.FSDP"
        assert "error" not in r, r["error"]
        assert r["optimizer"] == "GrassWalk" and r["router"] == "FSDPRouter"
        assert "basis" in r["state_keys"]
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model, train_dataset=Tokens(12),
        args=training_args(tmp_path / "ref", 3, per_device_train_batch_size=4,
                           lr_scheduler_type="constant"),
        optimizer_cls_and_kwargs=(slimopt.HFOptimizerFactory("grasswalk", update_interval=2),
                                  {"lr": 1e-3, "rank": 4}))
    trainer.train()
    reference = weights(model)
    diff = max((results[0]["weights"][n] - reference[n]).abs().max().item() for n in reference)
    assert diff <= 1e-5, diff


@pytest.mark.slow
def test_fsdp2_plain_trainer_refused_at_first_step(tmp_path):
    """The plain Trainer: accelerate swaps the optimizer's parameters for DTensors behind its
    back; slimopt refuses them at the first step; nothing trained."""
    results = _torchrun("plain", tmp_path, 29567, worker="hf_trainer_fsdp_worker.py", ranks=2)
    for r in results:
        assert "not one of its parameters" in r.get("error", ""), r
        assert all(torch.equal(r["initial"][n], r["weights"][n]) for n in r["initial"])


@pytest.mark.slow
def test_deepspeed_zero2_slimopt_trainer_resume_equals_uninterrupted(tmp_path):
    """DeepSpeed checkpoints through ``SlimoptTrainer`` (the bridge's state in
    ``zero_pp_rank_*_optim_states.pt``): resuming from checkpoint-2 in a fresh Trainer equals
    the uninterrupted 4 steps exactly."""
    r = _torchrun("slim_resume", tmp_path, 29568)
    assert "error" not in r, r["error"]
    assert r["chain"][-1] == "GrassWalk" and "basis" in r["state_keys"]
    assert (tmp_path / "checkpoint-2" / "global_step2").is_dir()
    a, b = r["uninterrupted"], r["weights"]
    assert max((a[n] - b[n]).abs().max().item() for n in a) == 0.0


def test_bypass_guard_stays_quiet_without_deepspeed():
    """Two legitimate optimizers on one model outside DeepSpeed (a watched slimopt optimizer
    never stepped, an AdamW stepping): no ZeRO-managed parameter, so no refusal; a parameter
    that looks ZeRO-managed (``_hp_mapping``) makes the same step refused, before AdamW's
    update."""
    from slimopt.integrations import bypass
    model = tiny_llama()
    slim = grasswalk(model)
    try:
        bypass.watch(slim)
        adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(**Tokens(2)[0:2]).loss.backward()
        adamw.step()
        other = torch.optim.AdamW(model.parameters(), lr=1e-3)
        weight = model.model.layers[0].self_attn.q_proj.weight
        weight._hp_mapping = object()   # what DeepSpeed ZeRO-1/2 links to each parameter
        before = weight.detach().clone()
        with pytest.raises(RuntimeError, match="SlimoptTrainer"):
            other.step()
        assert torch.equal(weight, before)
        del weight._hp_mapping
    finally:
        bypass.disable()
