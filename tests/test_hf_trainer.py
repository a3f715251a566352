"""HF ``Trainer`` with slimopt optimizers: without DeepSpeed (checkpoint every 3 steps, resume from
checkpoint-3 equals the uninterrupted run exactly), and under DeepSpeed ZeRO-2 (one torchrun rank,
CPU, gloo): ``SlimoptTrainer`` steps slimopt's math (equal to the one-process Trainer within
float rounding), the plain ``Trainer`` (which drops the optimizer and would train AdamW,
huggingface/transformers#38753) is refused by ``slimopt.integrations.bypass`` before any weight
changes, and an ``"optimizer"`` section in the DeepSpeed config is refused."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "distributed"))

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


def _torchrun(scenario, out, port):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", str(port), os.path.join(HERE, "distributed", "hf_deepspeed_worker.py"),
           scenario, str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    path = out / "result.pt"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same 4 steps with the plain Trainer, no DeepSpeed."""
    model, _ = _train(tmp_path_factory.mktemp("ref"), 4)
    return weights(model)


@pytest.mark.parametrize("scenario", [
    "slim", pytest.param("slim_factory", marks=pytest.mark.slow)])
def test_deepspeed_zero2_slimopt_trainer_steps_slimopt_math(scenario, tmp_path, one_process):
    r = _torchrun(scenario, tmp_path, 29561 if scenario == "slim" else 29562)
    assert "error" not in r, r["error"]
    assert r["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "GrassWalk"]
    assert "basis" in r["state_keys"]
    # fp32 throughout; the only differences are DeepSpeed's flat-buffer gradient norm for
    # clipping and its copies, i.e. float rounding (measured: 1.2e-7)
    diff = max((r["weights"][n] - one_process[n]).abs().max().item() for n in one_process)
    assert diff <= 1e-6, diff


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
