"""Generic tests run over every optimizer in the registry (resume, bad input, dense fallback,
state bytes, non-finite gradients, parameter groups, convergence)."""
import math
import warnings

import pytest
import torch
from torch import nn

import slimopt
from optimizer_registry import OPTIMIZERS, UNIVERSAL_BAD, info_id
from slimopt.optimizers.core.hyperparameters import OPTIMIZER_WIDE
from slimopt.optimizers.core.state_precision import stored_names

pytestmark = pytest.mark.parametrize("info", OPTIMIZERS, ids=info_id)


class Net(nn.Module):
    """Matrices in both orientations, a bias, a 3-D parameter and an embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.wide = nn.Linear(8, 14)        # weight 14 x 8 (m > n)
        self.tall = nn.Linear(14, 6)        # weight 6 x 14 (m < n)
        self.mix = nn.Parameter(torch.randn(2, 3, 6) * 0.1)

    def forward(self, idx):
        h = torch.tanh(self.wide(self.emb(idx)))
        out = self.tall(h)
        return out + torch.einsum("bd,kjd->bd", out, self.mix) * 0.01


def _batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (16,), generator=g), torch.randn(16, 6, generator=g)


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        idx, target = _batch(t)
        opt.zero_grad()
        loss = ((model(idx) - target) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.fixture(autouse=True)
def _only_the_tests_that_apply(request, info):
    if info.only is not None and request.node.originalname not in info.only:
        pytest.skip(f"{info.name}: {info.why}")


def _model(info):
    """``Net``, with LoRA adapters on its two Linears for a method that trains LoRA pairs."""
    model = Net()
    if info.lora_pairs:
        slimopt.lora.apply_lora(model, rank=2, alpha=4, targets=("wide", "tall"))
    return model


def _make(info, model, **overrides):
    kwargs = dict(info.kwargs, **overrides)
    return info.cls(model if info.lora_pairs else model.named_parameters(), **kwargs)


def _plain(obj):
    """True if obj holds only tensors, numbers, strings, None and containers of them."""
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_plain(x) for x in obj)
    if isinstance(obj, dict):
        return all(_plain(k) and _plain(v) for k, v in obj.items())
    return False


def test_resume_is_bit_exact(info, tmp_path):
    torch.manual_seed(0)
    model = _model(info)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    opt = _make(info, model)
    _train(model, opt, 11)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    model_a = _model(info)
    model_a.load_state_dict(init)
    opt_a = _make(info, model_a)
    _train(model_a, opt_a, 4)
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # plain data only, no pickles
    assert _plain(ckpt["opt"])
    model_b = _model(info)
    model_b.load_state_dict(ckpt["model"])
    opt_b = _make(info, model_b)
    opt_b.load_state_dict(ckpt["opt"])
    _train(model_b, opt_b, 7, start=4)
    for k, v in model_b.state_dict().items():
        assert torch.equal(v, straight[k]), k


@pytest.mark.parametrize("bad,needle", UNIVERSAL_BAD, ids=[str(b) for b, _ in UNIVERSAL_BAD])
def test_bad_hyperparameters_raise_naming_the_argument(info, bad, needle):
    with pytest.raises(ValueError) as err:
        _make(info, _model(info), **bad)
    message = str(err.value)
    assert needle in message and repr(next(iter(bad.values()))) in message


def test_method_specific_bad_input(info):
    for bad, needle in info.bad:
        with pytest.raises((ValueError, TypeError)) as err:
            _make(info, _model(info), **bad)
        assert needle in str(err.value), (bad, str(err.value))
        if needle != "unexpected":
            assert repr(next(iter(bad.values()))) in str(err.value)
    with pytest.raises(TypeError, match="unexpected keyword"):
        _make(info, _model(info), rnak=4)
    key = next(iter(info.group_bad))
    with pytest.raises(ValueError, match=key):  # a group override is checked too
        info.cls([{"params": [nn.Parameter(torch.ones(3, 3))], **info.group_bad}], **info.kwargs)


def test_sparse_and_complex_are_refused(info):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = _make(info, emb)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    with pytest.raises(ValueError, match="complex"):
        info.cls([nn.Parameter(torch.ones(3, 3, dtype=torch.complex64))], **info.kwargs)


def _adamw_twin(info, rank_override=None, dense_group=False):
    if info.kwargs.get("betas", (0.9, 0.999))[1] >= 1.0:
        pytest.skip("torch's AdamW has no beta2 = 1 (our dense path then sums like AdaGrad)")
    torch.manual_seed(3)
    model = Net()
    twin = Net()
    twin.load_state_dict(model.state_dict())
    kw = dict(info.kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if dense_group:
            opt = info.cls([{"params": model.parameters(), "dense": True}], **kw)
        else:
            opt = info.cls(model.parameters(), **dict(kw, rank=rank_override))
    ref = torch.optim.AdamW(twin.parameters(), lr=kw["lr"], weight_decay=kw["weight_decay"],
                            eps=opt.defaults["eps"], betas=opt.defaults["betas"], foreach=False)
    _train(model, opt, 6)
    _train(twin, ref, 6)
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    return caught


def test_full_rank_is_adamw_with_one_warning(info):
    if not info.subspace:
        pytest.skip("no rank")
    caught = _adamw_twin(info, rank_override=8)  # >= the smaller side of both matrices
    ours = [w for w in caught if "dense AdamW" in str(w.message)]
    assert len(ours) == 1
    assert "(14, 8)" in str(ours[0].message) and "(6, 14)" in str(ours[0].message)


def test_rank_none_is_adamw_without_warning(info):
    if not info.subspace:
        pytest.skip("no rank")
    caught = _adamw_twin(info, rank_override=None)
    assert not [w for w in caught if "dense AdamW" in str(w.message)]


def test_dense_group_is_adamw(info):
    _adamw_twin(info, dense_group=True)


def test_state_bytes_counts_every_tensor(info):
    model = Net()
    opt = _make(info, model)
    _train(model, opt, 2)
    # every 2-D parameter (the embedding too, when model.parameters() is passed) takes the rule
    group = opt.param_groups[0]
    floats = sum(info.state_floats(p, info.kwargs) if opt.takes_matrix_rule(p, group)
                 else 2 * p.numel() for p in model.parameters())
    if info.state_dtype == "float32":
        assert slimopt.state_bytes(opt) == 4 * floats
    else:  # each low-precision moment's float32 bytes replaced by what it stores
        low = [t for s in opt.state.values() for k, t in s.items() if torch.is_tensor(t)
               and k.endswith(("_bf16", "_int8"))]
        stored = sum(t.numel() * (2 if t.dtype == torch.bfloat16 else 1)
                     + 4 * -(-t.numel() // 256) * (t.dtype == torch.uint8) for t in low)
        assert low and slimopt.state_bytes(opt) == 4 * (floats - sum(t.numel() for t in low)) \
            + stored
    adamw = torch.optim.AdamW(model.parameters())
    _train(model, adamw, 1)
    assert slimopt.state_bytes(adamw) == 4 * 2 * sum(p.numel() for p in model.parameters()) \
        + 4 * len(list(model.parameters()))  # torch keeps a float32 step tensor per parameter


def test_init_state_on_meta_device(info):
    with torch.device("meta"):
        model = Net()
    opt = _make(info, model)
    opt.init_state()
    meta_bytes = slimopt.state_bytes(opt)
    real = Net()
    opt_real = _make(info, real)
    _train(real, opt_real, 1)
    assert meta_bytes == slimopt.state_bytes(opt_real)


def test_nonfinite_gradient_skips_that_parameter(info):
    model = Net()
    opt = _make(info, model)
    _train(model, opt, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state_before = {k: (v.clone() if torch.is_tensor(v) else v)
                    for k, v in opt.state[model.tall.weight].items()}
    idx, target = _batch(99)
    opt.zero_grad()
    ((model(idx) - target) ** 2).mean().backward()
    model.tall.weight.grad[0, 0] = float("nan")
    model.wide.weight.grad[1, 1] = float("inf")
    opt.step()
    assert torch.equal(model.tall.weight, before["tall.weight"])
    assert torch.equal(model.wide.weight, before["wide.weight"])
    assert not torch.equal(model.tall.bias, before["tall.bias"])  # the others still step
    state = opt.state[model.tall.weight]
    for k, v in state_before.items():
        if k != "nonfinite_skips":
            assert (torch.equal(v, state[k]) if torch.is_tensor(v) else v == state[k]), k
    assert state["nonfinite_skips"] == 1 and opt.nonfinite_skips() == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _train(model, opt, 2, start=5)  # training goes on from clean state
    assert all(torch.isfinite(p).all() for p in model.parameters())

    strict = _make(info, model, nonfinite="raise")
    model.tall.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        strict.step()


def test_param_groups_keep_their_own_hyperparameters(info):
    model = Net()
    frozen_like = {k: v for k, v in dict(info.kwargs, lr=0.0, weight_decay=0.0).items()
                   if k not in OPTIMIZER_WIDE}  # a group takes the per-group options only
    opt = info.cls([{"params": [model.tall.weight], **frozen_like},
                    {"params": [p for n, p in model.named_parameters() if n != "tall.weight"],
                     "dense": True}], **info.kwargs)
    before = model.tall.weight.detach().clone()
    _train(model, opt, 3)
    assert torch.equal(model.tall.weight, before)
    assert opt.param_groups[1]["dense"] and not opt.param_groups[0]["dense"]
    moments = {n for k in ("exp_avg", "exp_avg_sq") for n in stored_names(k, info.state_dtype)}
    assert set(opt.state[model.wide.weight]) == {"step", "nonfinite_skips", "key"} | moments


def test_least_squares_loss_decreases(info):
    torch.manual_seed(5)
    A = torch.randn(128, 32)
    X_true = torch.randn(32, 48)
    B = A @ X_true
    W = nn.Parameter(torch.zeros(32, 48))
    kwargs = dict(info.kwargs, lr=info.ls_lr, weight_decay=0.0)
    if info.subspace:
        kwargs.update(rank=8, update_interval=10)
    opt = info.cls([W], **kwargs)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = ((A @ W - B) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.1 * losses[0]



def test_register_with_torch_optim(info):
    names = slimopt.register_with_torch_optim()
    assert getattr(torch.optim, info.name) is info.cls and info.name in names
