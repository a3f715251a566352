"""``slimopt.step_in_backward``: steps fused into backward equal ordinary ``optimizer.step()``
calls, with gradient accumulation, per-parameter clipping, a scheduler and a resume; what it
cannot do is refused."""
import pytest
import torch

import slimopt

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
