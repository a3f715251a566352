"""``slimopt.step_in_backward``: steps fused into backward equal ordinary ``optimizer.step()``
calls, with gradient accumulation, per-parameter clipping, a scheduler and a resume, in one process
and under DDP on 2 CPU ranks (``tests/distributed/step_in_backward_worker.py``); what it cannot do
is refused."""
import json
import os
import subprocess
import sys

import pytest
import torch

import slimopt
from net import free_port

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed",
                      "step_in_backward_worker.py")
DDP_RUNS = ["run:mlp:1:0", "run:mlp:4:0.05", "run:llama:1:0", "run:llama:4:0.5",
            "run:mlp:4:0.05:int8", "run:llama:4:0.5:bfloat16"]

OPTIMIZERS = [
    (slimopt.GaLore, dict(rank=4, update_interval=3)),
    (slimopt.GrassWalk, dict(rank=4, update_interval=3)),
    (slimopt.GrassJump, dict(rank=4, update_interval=3)),
    (slimopt.SNSM, dict(rank=4, update_interval=3)),
    (slimopt.SubsetNorm, dict()),
    (slimopt.ROOT, dict()),
]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 6))


def _batches(steps, accumulation):
    g = torch.Generator().manual_seed(7)
    return [[(torch.randn(5, 12, generator=g), torch.randn(5, 6, generator=g))
             for _ in range(accumulation)] for _ in range(steps)]


def _loss(model, x, y, accumulation):
    return torch.nn.functional.mse_loss(model(x), y) / accumulation


def _ordinary(cls, options, batches, accumulation, clip=None, scheduler=False):
    model = _model()
    opt = cls(model.named_parameters(), lr=1e-2, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if scheduler else None
    for micro in batches:
        for x, y in micro:
            _loss(model, x, y, accumulation).backward()
        if clip is not None:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        opt.zero_grad()
        if sched:
            sched.step()
    return model


def _in_backward(cls, options, batches, accumulation, clip=None, scheduler=False):
    model = _model()
    opt = cls(model.named_parameters(), lr=1e-2, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t)) if scheduler else None
    handle = slimopt.step_in_backward(opt, accumulation_steps=accumulation, max_grad_norm=clip)
    for micro in batches:
        for i, (x, y) in enumerate(micro):
            _loss(model, x, y, accumulation).backward()
            assert handle.stepped == (i == accumulation - 1)
        assert all(p.grad is None for p in model.parameters())  # freed as they stepped
        if sched:
            sched.step()
    handle.remove()
    return model


def _assert_same(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,options", OPTIMIZERS, ids=lambda x: getattr(x, "__name__", ""))
@pytest.mark.parametrize("accumulation", [1, 4])
def test_equal_to_ordinary_steps(cls, options, accumulation):
    batches = _batches(7, accumulation)
    _assert_same(_in_backward(cls, options, batches, accumulation),
                 _ordinary(cls, options, batches, accumulation))


def test_per_parameter_clipping_and_a_scheduler():
    batches = _batches(6, 2)
    clipped = _in_backward(slimopt.GrassWalk, dict(rank=4, update_interval=3), batches, 2,
                           clip=0.05, scheduler=True)
    _assert_same(clipped, _ordinary(slimopt.GrassWalk, dict(rank=4, update_interval=3), batches,
                                    2, clip=0.05, scheduler=True))
    unclipped = _ordinary(slimopt.GrassWalk, dict(rank=4, update_interval=3), batches, 2,
                          scheduler=True)
    assert any(not torch.allclose(p, q) for p, q in zip(clipped.parameters(),
                                                         unclipped.parameters()))


def test_resume_continues_exactly(tmp_path):
    batches = _batches(8, 2)
    straight = _in_backward(slimopt.GrassWalk, dict(rank=4, update_interval=3), batches, 2)
    model = _model()
    opt = slimopt.GrassWalk(model.named_parameters(), lr=1e-2, rank=4, update_interval=3)
    handle = slimopt.step_in_backward(opt, accumulation_steps=2)
    for micro in batches[:3]:
        for x, y in micro:
            _loss(model, x, y, 2).backward()
    handle.remove()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt = slimopt.GrassWalk(resumed.named_parameters(), lr=1e-2, rank=4, update_interval=3)
    opt.load_state_dict(ckpt["opt"])
    handle = slimopt.step_in_backward(opt, accumulation_steps=2)
    for micro in batches[3:]:
        for x, y in micro:
            _loss(resumed, x, y, 2).backward()
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


def test_remove_restores_ordinary_gradients():
    model = _model()
    opt = slimopt.GaLore(model.named_parameters(), lr=1e-2, rank=4)
    slimopt.step_in_backward(opt).remove()
    x, y = _batches(1, 1)[0][0]
    _loss(model, x, y, 1).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_what_it_cannot_do_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="slimopt optimizer"):
        slimopt.step_in_backward(torch.optim.AdamW(model.parameters()))
    opt = slimopt.GaLore(model.named_parameters(), lr=1e-2, rank=4)
    for bad, needle in [(dict(accumulation_steps=0), "accumulation_steps"),
                        (dict(accumulation_steps=2.0), "accumulation_steps"),
                        (dict(max_grad_norm=0.0), "max_grad_norm"),
                        (dict(max_grad_norm=True), "max_grad_norm")]:
        with pytest.raises(ValueError, match=needle):
            slimopt.step_in_backward(opt, **bad)
    A, B = torch.nn.Parameter(torch.randn(2, 8)), torch.nn.Parameter(torch.randn(8, 2))
    with pytest.raises(ValueError, match="pair"):
        slimopt.step_in_backward(slimopt.AdaPreLoRA([{"params": [A, B]}], lr=1e-2))


@pytest.fixture(scope="module")
def ddp_rows():
    pytest.importorskip("transformers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", WORKER, *DDP_RUNS, "remove", "nosync", "refuse"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row.pop("scenario"): row for row in rows}


@pytest.mark.parametrize("scenario", DDP_RUNS)
def test_ddp_equal_to_ordinary_ddp_steps(ddp_rows, scenario):
    """GrassWalk on an MLP (DDP's default buckets) and GaLore on a tiny LLaMA whose dense AdamW
    parameters (embeddings, head) hold most weights (one-parameter buckets, gradient views of
    the buckets), accumulation 1 and 4 (the first 3 under no_sync), with and without clipping,
    and with int8 and bfloat16 moments:
    equal to DDP + optimizer.step() on the averaged gradients, every .grad freed after each
    step, and take_grad_norm() the norm clip_grad_norm_ reports (float rounding)."""
    row = ddp_rows[scenario]
    assert row["moved"] > 1e-2  # the runs train
    assert row["max_diff"] <= 1e-6
    assert row["freed"]
    assert row["norm_diff"] <= 1e-5


def test_ddp_remove_and_misuse(ddp_rows):
    assert ddp_rows["remove"]["max_diff"] <= 1e-6  # the hook averages into .grad after remove()
    assert "no_sync" in ddp_rows["nosync"]["error"]
    no_ddp, twice, unused, not_ddp = ddp_rows["refuse"]["errors"]
    assert "ddp=" in no_ddp and "already has a communication hook" in twice
    assert "find_unused_parameters" in unused and "DistributedDataParallel" in not_ddp


def test_take_grad_norm_is_the_global_pre_clip_norm():
    batches = _batches(2, 1)
    model = _model()
    handle = slimopt.step_in_backward(slimopt.GrassWalk(model.named_parameters(), lr=1e-2,
                                                        rank=4), max_grad_norm=1e-3)
    assert handle.take_grad_norm() is None
    reference = _model()
    x, y = batches[0][0]
    _loss(reference, x, y, 1).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
    _loss(model, x, y, 1).backward()
    torch.testing.assert_close(handle.take_grad_norm(), expected)
    assert handle.take_grad_norm() is None  # a new count
