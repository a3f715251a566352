"""accelerate with slimopt optimizers: ``prepare(model, opt, dataloader, scheduler)``,
``accelerator.accumulate`` with gradient accumulation 2, ``clip_grad_norm_`` when
``sync_gradients``: equal to a hand-written loop (exactly without DeepSpeed; within float
rounding under DeepSpeed ZeRO-2 through ``slimopt.integrations.accelerate.prepare``, one torchrun
rank on the CPU); the plain ``accelerator.prepare`` under DeepSpeed is refused before a step."""
import os
import sys

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "distributed"))

from hf_launch import torchrun_results  # noqa: E402
from hf_common import (accelerate_loop, grasswalk, hand_loop, loader, schedule,  # noqa: E402
                       tiny_llama, weights)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _hand_reference():
    model = tiny_llama()
    opt = grasswalk(model)
    hand_loop(model, opt, schedule(opt), loader(16))
    return weights(model), opt


def _max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_accelerate_accumulate_equals_hand_loop(fresh_accelerate_state):
    from accelerate import Accelerator

    from slimopt.integrations.accelerate import prepare
    reference, ref_opt = _hand_reference()
    model = tiny_llama()
    opt = grasswalk(model)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    p_model, p_opt, p_loader, p_sched = prepare(accelerator, model, opt, loader(16),
                                                schedule(opt))
    assert p_opt.optimizer is opt
    assert accelerate_loop(accelerator, p_model, p_opt, p_sched, p_loader) == 4
    assert any("basis" in s for s in opt.state.values())
    assert _max_diff(reference, weights(model)) == 0.0


def _torchrun(scenario, out, port=None, worker="hf_accelerate_worker.py", ranks=1, env=()):
    """``worker`` under torchrun (``port`` is ignored: a free one is taken)."""
    return torchrun_results(worker, scenario, out, ranks, env)


def test_accelerate_deepspeed_zero2_bridge_equals_hand_loop(tmp_path):
    r = _torchrun("bridge", tmp_path, 29571)
    assert "error" not in r, r["error"]
    assert r["chain"] == ["DeepSpeedOptimizerWrapper", "DeepSpeedZeroOptimizer", "GrassWalk"]
    assert r["steps"] == 4 and "basis" in r["state_keys"]
    reference, _ = _hand_reference()
    diff = _max_diff(reference, r["weights"])
    # float rounding (DeepSpeed's fp32 accumulation buffer, flat-buffer clipping norm), which
    # Adam's normalisation can amplify where a gradient is near zero; measured 1.4e-6. The bound
    # is 1% of one step (lr 1e-3): an AdamW or vector-rule step would miss it by far.
    assert diff <= 1e-5, diff


@pytest.mark.slow
def test_accelerate_deepspeed_plain_prepare_refused(tmp_path):
    r = _torchrun("plain", tmp_path, 29572)
    assert "flat shards" in r.get("error", ""), r
    assert not r["changed"]


def _fsdp2(scenario, tmp_path, port):
    return _torchrun(scenario, tmp_path, port, worker="hf_fsdp_worker.py", ranks=2,
                     env={"HF_FSDP_FORCE_CPU": "1"})


def test_accelerate_fsdp2_two_ranks_steps_slimopt_math(tmp_path):
    """accelerate's FSDP2 prepare (forced on the CPU, see hf_fsdp_worker.py) on 2 gloo ranks,
    through ``slimopt.integrations.accelerate.prepare``: the FSDP2 router steps the sharded
    parameters; equal to one process within float rounding (measured 2.3e-7)."""
    results = _fsdp2("bridge", tmp_path, 29573)
    for r in results:
        assert r["distributed_type"] == "DistributedType.FSDP" and r["world"] == 2
        assert "error" not in r, r["error"]
        assert r["router"] == "FSDPRouter" and r["steps"] == 3
    # each matrix's low-rank state lives on its owner rank; between them, both ranks hold some
    assert all("basis" in r["state_keys"] for r in results)
    diff = _max_diff(results[0]["reference"], results[0]["weights"])
    assert diff <= 1e-5, diff
    assert _max_diff(results[0]["weights"], results[1]["weights"]) == 0.0


@pytest.mark.slow
def test_accelerate_fsdp2_plain_prepare_refused(tmp_path):
    """Without the helper, accelerate swaps the parameters behind the optimizer's back: refused
    at the first step (the optimizer does not know the DTensor parameters), nothing trained."""
    results = _fsdp2("plain", tmp_path, 29574)
    for r in results:
        assert "not one of its parameters" in r.get("error", ""), r
        assert _max_diff(r["initial"], r["weights"]) == 0.0
