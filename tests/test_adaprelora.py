"""AdaPreLoRA: the closed-form factor step's defining properties in float64 (against a brute-force
weighted least-squares solve), Adafactor statistics against torch's Adafactor, pairing with peft
and slimopt's wrapper, ReLoRA merges, resume and errors."""
import pytest
import torch
from torch import nn

import slimopt
from slimopt.lora import LoRALinear, ReLoRA, apply_lora, find_lora_pairs, lora_param_groups, \
    merge_and_reset_
from slimopt.optimizers.core.lora_preconditioner import (adafactor_statistics_, adafactor_weights,
                                                         factor_update, reachable_gradient)

DT = torch.float64


def _setup(m=7, n=9, r=3, s=0.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=g, dtype=DT)
    A = torch.randn(r, n, generator=g, dtype=DT)
    G = torch.randn(m, n, generator=g, dtype=DT)
    p = torch.rand(m, generator=g, dtype=DT) + 0.3
    q = torch.rand(n, generator=g, dtype=DT) + 0.3
    return A, B, G, p, q, s


def _step(A, B, G, p, q, s):
    d_a, d_b = factor_update(A, B, s * B.T @ G, s * G @ A.T, p, q, s, damping=0.0)
    return d_a, d_b, s * (B @ d_a + d_b @ A)


def _h_norm(Y, p, q):
    return float((p[:, None] * Y * Y * q).sum().sqrt())


def test_step_is_the_weighted_least_squares_projection():
    A, B, G, p, q, s = _setup()
    _, _, delta = _step(A, B, G, p, q, s)
    target = G / p[:, None] / q
    m, n, r = G.shape[0], G.shape[1], A.shape[0]
    # brute force over the whole family {B X + Y A}: unknowns vec(X) (r x n) and vec(Y) (m x r)
    cols = []
    for i in range(r):
        for j in range(n):
            X = torch.zeros(r, n, dtype=DT)
            X[i, j] = 1
            cols.append((B @ X).flatten())
    for i in range(m):
        for j in range(r):
            Y = torch.zeros(m, r, dtype=DT)
            Y[i, j] = 1
            cols.append((Y @ A).flatten())
    design = torch.stack(cols, dim=1)
    w = (p[:, None] * q).flatten().sqrt()
    sol = torch.linalg.lstsq(design * w[:, None], target.flatten() * w, driver="gelsd").solution
    brute = (design @ sol).reshape(m, n)
    torch.testing.assert_close(delta, brute, rtol=1e-10, atol=1e-11)
    # the normal equations, the cheaper form
    resid = p[:, None] * (delta - target) * q
    assert (B.T @ resid).abs().max() < 1e-11 and (resid @ A.T).abs().max() < 1e-11


def test_chosen_member_minimizes_the_imbalance():
    A, B, G, p, q, s = _setup(seed=1)
    d_a, d_b, _ = _step(A, B, G, p, q, s)
    gap = B @ d_a - d_b @ A
    assert (B.T @ (p[:, None] * gap * q) @ A.T).abs().max() < 1e-11
    best = _h_norm(gap, p, q)
    g = torch.Generator().manual_seed(5)
    for _ in range(20):  # any other member (dB + B K, dA - K A) is less balanced
        K = 1e-3 * torch.randn(A.shape[0], A.shape[0], generator=g, dtype=DT)
        other = B @ (d_a - K @ A) - (d_b + B @ K) @ A
        assert _h_norm(other, p, q) > best


def test_descent_and_invariance():
    A, B, G, p, q, s = _setup(seed=2)
    d_a, d_b, delta = _step(A, B, G, p, q, s)
    assert float((G * delta).sum()) == pytest.approx(_h_norm(delta, p, q) ** 2, rel=1e-10)
    S = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(3)) + 3 * torch.eye(3)
    d_a2, d_b2, _ = _step(S @ A, B @ torch.linalg.inv(S), G, p, q, s)
    torch.testing.assert_close(B @ torch.linalg.inv(S) @ d_a2, B @ d_a, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(d_b2 @ S @ A, d_b @ A, rtol=1e-9, atol=1e-11)


def test_full_rank_limit_and_lora_pro_tangent():
    A, B, G, p, q, s = _setup(m=5, n=5, r=5, seed=4)
    d_a, _, delta = _step(A, B, G, p, q, s)
    target = G / p[:, None] / q
    torch.testing.assert_close(delta, target, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(s * B @ d_a, target / 2, rtol=1e-9, atol=1e-11)
    A, B, G, _, _, s = _setup(seed=5)
    ones_m, ones_n = torch.ones(G.shape[0], dtype=DT), torch.ones(G.shape[1], dtype=DT)
    _, _, delta = _step(A, B, G, ones_m, ones_n, s)
    PB = B @ torch.linalg.inv(B.T @ B) @ B.T
    PA = A.T @ torch.linalg.inv(A @ A.T) @ A
    tangent = PB @ G + G @ PA - PB @ G @ PA
    torch.testing.assert_close(delta, tangent, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(reachable_gradient(A, B, s * B.T @ G, s * G @ A.T, s, 0.0),
                               tangent, rtol=1e-9, atol=1e-11)


def test_statistics_equal_torch_adafactor():
    g = torch.Generator().manual_seed(6)
    w = nn.Parameter(torch.zeros(6, 10, dtype=DT))
    ref = torch.optim.Adafactor([w], lr=0.0)
    row, col = torch.zeros(6, dtype=DT), torch.zeros(10, dtype=DT)
    for t in range(1, 6):
        grad = torch.randn(6, 10, generator=g, dtype=DT)
        w.grad = grad.clone()
        ref.step()
        adafactor_statistics_(row, col, grad, t)
        torch.testing.assert_close(row, ref.state[w]["row_var"].flatten(), rtol=1e-14, atol=0)
        torch.testing.assert_close(col, ref.state[w]["col_var"].flatten(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_weights_floor_is_representable(dtype):
    """Zero statistics (a first gradient of zeros): the floor eps1 = 1e-30 must not square to 0
    (1e-60 is 0 in float32), else q = 0 and grad / q is 0 / 0 (review defect 2)."""
    row, col = torch.zeros(5, dtype=dtype), torch.zeros(7, dtype=dtype)
    col[0] = 4.0
    p, q = adafactor_weights(row, col, 1e-30)
    assert (p > 0).all() and (q > 0).all() and p.isfinite().all() and q.isfinite().all()
    assert q[0] == 2.0 and q[1] == torch.tensor(1e-30, dtype=dtype)
    assert (torch.zeros(7, dtype=dtype) / q).eq(0).all()


def _pair_module(m=8, n=6, r=3, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(n, m).double(), rank=r, alpha=6)
    nn.init.normal_(layer.lora_B.weight)  # a non-zero B so every term is exercised
    return layer


def test_optimizer_step_is_the_formula():
    layer = _pair_module()
    A0, B0 = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    opt = slimopt.AdaPreLoRA(layer, lr=0.1, beta1=0.0, clip_threshold=None, damping=0.0)
    x = torch.randn(16, 6, dtype=DT)
    layer(x).square().sum().backward()
    gA, gB = layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()
    opt.step()
    s = layer.scaling
    seen = reachable_gradient(A0, B0, gA, gB, s, 0.0)
    row = seen.square().mean(dim=1)   # first step: beta2_1 = 0, the statistics are the means
    col = seen.square().mean(dim=0)
    p, q = (row / row.mean()).sqrt(), col.sqrt()
    d_a, d_b = factor_update(A0, B0, gA, gB, p, q, s, 0.0)
    torch.testing.assert_close(layer.lora_A.weight.detach(), A0 - 0.1 * d_a)
    torch.testing.assert_close(layer.lora_B.weight.detach(), B0 - 0.1 * d_b)


# ---------------------------------------------------------------------------- the whole step
# An independent float64 reference of the documented training step, from the equations: the true
# W-space gradient G of a least-squares loss, explicit projectors, diagonal P and Q, explicit
# inverses, the W-space step formed and its RMS taken elementwise. It shares no code with
# core/lora_preconditioner.py, so it can catch the clipping, momentum, beta2 schedule and default
# damping of the training loop, which the closed-form tests above do not reach.
def _problem(seed, m=7, n=9, r=3):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=DT)
    A = torch.randn(r, n, generator=g, dtype=DT)
    B = torch.randn(m, r, generator=g, dtype=DT)
    batches = [(torch.randn(16, n, generator=g, dtype=DT), torch.randn(16, m, generator=g,
                                                                       dtype=DT))
               for _ in range(5)]
    return W0, A, B, batches


def _true_gradient(W, x, y):
    """dL/dW of L = 1/2 sum (x W^T - y)^2."""
    return (x @ W.T - y).T @ x


def _damped_inverse(gram, damping):
    r = gram.shape[0]
    lam = damping * (torch.trace(gram) / r + 1e-12)
    return torch.linalg.inv(gram + lam * torch.eye(r, dtype=DT))


class _Reference:
    """The step as documented, one instance per run (its own statistics and momentum)."""

    def __init__(self, m, n, r, *, lr, beta1=0.9, momentum_on="gradients", beta2_decay=-0.8,
                 damping=1e-6, clip_threshold=1.0, weight_decay=0.0, scale=1.0):
        self.R, self.C = torch.zeros(m, dtype=DT), torch.zeros(n, dtype=DT)
        self.mA, self.mB = torch.zeros(r, n, dtype=DT), torch.zeros(m, r, dtype=DT)
        self.t, self.rms = 0, []  # rms: (with, without the cross term) before clipping, per step
        self.lr, self.b1, self.on, self.decay = lr, beta1, momentum_on, beta2_decay
        self.damping, self.clip, self.wd, self.s = damping, clip_threshold, weight_decay, scale

    def _average(self, x_a, x_b):
        if self.b1 == 0:
            return x_a, x_b
        self.mA = self.b1 * self.mA + (1 - self.b1) * x_a
        self.mB = self.b1 * self.mB + (1 - self.b1) * x_b
        correction = 1 - self.b1 ** self.t
        return self.mA / correction, self.mB / correction

    def step(self, A, B, G):
        """``(A, B)`` after one step, for the W-space gradient ``G``."""
        self.t += 1
        s, m, n = self.s, G.shape[0], G.shape[1]
        g_a, g_b = s * B.T @ G, s * G @ A.T
        PB = B @ _damped_inverse(B.T @ B, self.damping) @ B.T       # projector onto col(B)
        PA = A.T @ _damped_inverse(A @ A.T, self.damping) @ A       # projector onto row(A)
        seen = PB @ G + G @ PA - PB @ G @ PA
        w = self.t ** self.decay                                    # 1 - beta2_t
        self.R = (1 - w) * self.R + w * (seen ** 2).sum(dim=1) / n
        self.C = (1 - w) * self.C + w * (seen ** 2).sum(dim=0) / m
        P = torch.diag(torch.sqrt(self.R / self.R.mean()))
        Q = torch.diag(torch.sqrt(self.C))
        if self.on == "gradients":
            g_a, g_b = self._average(g_a, g_b)
        bpb_inv = _damped_inverse(B.T @ P @ B, self.damping)
        aqa_inv = _damped_inverse(A @ Q @ A.T, self.damping)
        Pi, Qi = torch.linalg.inv(P), torch.linalg.inv(Q)
        d_a = bpb_inv @ (g_a @ Qi - 0.5 * (g_a @ A.T) @ aqa_inv @ A) / s ** 2
        d_b = (Pi @ g_b - 0.5 * B @ bpb_inv @ (B.T @ g_b)) @ aqa_inv / s ** 2
        delta = s * (B @ d_a + d_b @ A)
        rms = float(torch.sqrt((delta ** 2).sum() / (m * n)))
        no_cross = float(torch.sqrt(((s * B @ d_a) ** 2 + (s * d_b @ A) ** 2).sum() / (m * n)))
        self.rms.append((rms, no_cross))
        if self.clip is not None and rms > self.clip:
            d_a, d_b = d_a * (self.clip / rms), d_b * (self.clip / rms)
        if self.on == "steps":
            d_a, d_b = self._average(d_a, d_b)
        decay = 1 - self.lr * self.wd
        return decay * A - self.lr * d_a, decay * B - self.lr * d_b


def _compare_runs(seed, options, reference=None, steps=5, scale=0.8, lr=0.05):
    """The optimizer (built with ``options``) against ``_Reference`` (with ``reference``, default
    the same options) over ``steps`` steps, after each step; returns the reference."""
    W0, A0, B0, batches = _problem(seed)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = slimopt.AdaPreLoRA([{"params": [A, B], "lora_scale": scale}], lr=lr, **options)
    ref = _Reference(B0.shape[0], A0.shape[1], A0.shape[0], lr=lr, scale=scale,
                     **(options if reference is None else reference))
    a, b = A0.clone(), B0.clone()
    for x, y in batches[:steps]:
        G = _true_gradient(W0 + scale * b @ a, x, y)
        A.grad, B.grad = scale * B.detach().T @ G, scale * G @ A.detach().T
        opt.step()
        a, b = ref.step(a, b, G)
        torch.testing.assert_close(A.detach(), a, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B.detach(), b, rtol=1e-10, atol=1e-12)
    ref.A, ref.B = a, b
    return ref


CLIP_BINDS = 1e-3  # far below the unclipped steps' W-space RMS of this problem (checked below)


@pytest.mark.parametrize("momentum_on", ["gradients", "steps"])
@pytest.mark.parametrize("beta1,clip", [(0.9, None), (0.9, CLIP_BINDS), (0.0, None),
                                        (0.0, CLIP_BINDS), (0.5, 1.0)])
def test_training_step_is_the_documented_formula(momentum_on, beta1, clip):
    """Statistics of the reachable gradient with beta2_t = 1 - t^-0.8, the damped closed-form
    solve, clipping to the W-space RMS (cross term included), momentum on the gradients (or the
    steps) with bias correction, weight decay, over five steps against the float64 reference."""
    ref = _compare_runs(0, dict(beta1=beta1, momentum_on=momentum_on, clip_threshold=clip,
                                damping=1e-4, weight_decay=0.1))
    if clip == CLIP_BINDS:  # clipped at every step, where the RMS's cross term matters
        assert all(rms > 100 * clip and abs(rms / no_cross - 1) > 1e-3
                   for rms, no_cross in ref.rms), ref.rms


def test_default_hyperparameters_are_used_by_a_step():
    """Only lr given: damping 1e-6, beta2_t = 1 - t^-0.8, beta1 0.9 on the gradients, clip 1.0,
    no weight decay, as documented (the reference spells them out)."""
    _compare_runs(3, {}, dict(beta1=0.9, momentum_on="gradients", beta2_decay=-0.8,
                              damping=1e-6, clip_threshold=1.0, weight_decay=0.0))


def test_default_damping_matters_on_a_peft_start():
    """From peft's B = 0 the damping of A Q A^T sets the first B step: the default 1e-6 against
    the formula, and a damping of 1e-1 visibly different (so the test can tell them apart)."""
    W0, A0, _, batches = _problem(4)
    B0 = torch.zeros(7, 3, dtype=DT)
    A, B = nn.Parameter(A0.clone()), nn.Parameter(B0.clone())
    opt = slimopt.AdaPreLoRA([{"params": [A, B]}], lr=0.01, beta1=0.0, clip_threshold=None)
    G = _true_gradient(W0, *batches[0])
    A.grad, B.grad = B0.T @ G, G @ A0.T
    opt.step()
    expected = {}
    for damping in (1e-6, 1e-1):
        ref = _Reference(7, 9, 3, lr=0.01, beta1=0.0, clip_threshold=None, damping=damping)
        expected[damping] = ref.step(A0, B0, G)
    torch.testing.assert_close(A.detach(), A0)  # g_A = B^T G = 0
    torch.testing.assert_close(B.detach(), expected[1e-6][1], rtol=1e-10, atol=1e-12)
    assert (expected[1e-1][1] - expected[1e-6][1]).abs().max() > 1e-2 * B.abs().max()


def test_momentum_on_gradients_is_not_the_old_placement():
    """Both placements keep the same state, and they differ from the second step on."""
    runs = {on: _compare_runs(1, dict(momentum_on=on, clip_threshold=None), steps=3)
            for on in ("gradients", "steps")}
    assert (runs["gradients"].A - runs["steps"].A).abs().max() > 1e-6


def test_checkpoint_without_momentum_on_loads_as_steps():
    """A state saved before the option existed meant the EMA of the solved steps."""
    layer = _pair_module()
    opt = slimopt.AdaPreLoRA(layer, lr=1e-2)
    layer(torch.randn(4, 6, dtype=DT)).square().sum().backward()
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["momentum_on"]
    fresh = slimopt.AdaPreLoRA(layer, lr=1e-2)
    fresh.load_state_dict(saved)
    assert [g["momentum_on"] for g in fresh.param_groups] == ["steps"] * len(fresh.param_groups)
    assert all("momentum_on" not in g for g in saved["param_groups"])  # the caller's is kept
    again = slimopt.AdaPreLoRA(layer, lr=1e-2)
    again.load_state_dict(opt.state_dict())
    assert all(g["momentum_on"] == "gradients" for g in again.param_groups)


def _toy(seed=0):
    torch.manual_seed(seed)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(12, 16)
            self.up_proj = nn.Linear(16, 5)
            self.norm = nn.LayerNorm(12)

        def forward(self, x):
            return self.up_proj(torch.tanh(self.q_proj(self.norm(x))))
    model = apply_lora(Toy(), rank=4, alpha=8)
    model.norm.weight.requires_grad_(True)  # a non-LoRA trainable parameter: AdamW
    return model


def _train(model, opt, steps, start=0):
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(32, 12, generator=g), torch.randn(32, 5, generator=g)
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
    return loss.item()


def test_trains_and_counts_state():
    # resume bit-exactness: the generic test (tests/test_generic.py, AdaPreLoRA's entry)
    model = _toy()
    opt = slimopt.AdaPreLoRA(model, lr=1e-2)
    first = _train(model, opt, 1)
    last = _train(model, opt, 40, start=1)
    assert last < first
    pairs = find_lora_pairs(model)
    expected = sum((p.B.shape[0] + p.A.shape[1]) * (1 + p.A.shape[0]) for p in pairs)
    expected += 2 * model.norm.weight.numel()
    assert slimopt.state_bytes(opt) == 4 * expected


def test_relora_merge_keeps_the_function_and_grows_the_rank():
    model = _toy(seed=1)
    base0 = model.q_proj.base.weight.detach().clone()
    opt = slimopt.AdaPreLoRA(model, lr=3e-2)
    relora = ReLoRA(model, opt, every=10)
    x = torch.randn(8, 12)
    for t in range(30):
        g = torch.Generator().manual_seed(t)
        xb, yb = torch.randn(32, 12, generator=g), torch.randn(32, 5, generator=g)
        opt.zero_grad()
        (model(xb) - yb).square().mean().backward()
        opt.step()
        if t == 9:
            before = model(x).detach()
            assert relora.step()
            torch.testing.assert_close(model(x).detach(), before, rtol=1e-5, atol=1e-6)
            assert model.q_proj.lora_B.weight.abs().max() == 0
            assert opt.state[model.q_proj.lora_A.weight]["exp_avg"].abs().max() == 0
        else:
            relora.step()
    assert relora.merges == 3
    change = model.q_proj.base.weight.detach() - base0
    assert int(torch.linalg.matrix_rank(change)) > 4  # more than one rank-4 LoRA could hold


def test_finds_peft_pairs_and_trains_a_peft_model():
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=32)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj", "up_proj"]))
    pairs = find_lora_pairs(model)
    assert len(pairs) == 2 * 3 and all(p.scale == 2.0 for p in pairs)
    opt = slimopt.AdaPreLoRA(model, lr=1e-2)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    before = model(input_ids=ids).logits.detach()
    merge_and_reset_(model, opt)
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), before, rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="no LoRA pair"):
        slimopt.AdaPreLoRA(nn.Linear(3, 3))
    A, B = nn.Parameter(torch.zeros(2, 5)), nn.Parameter(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="rank mismatch"):
        slimopt.AdaPreLoRA([{"params": [A, B]}])
    with pytest.raises(ValueError, match="holds"):
        slimopt.AdaPreLoRA([{"params": [A]}])

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = nn.Linear(3, 2, bias=False)
    with pytest.raises(ValueError, match="unpaired"):
        find_lora_pairs(Broken())
    bad_b = LoRALinear(nn.Linear(5, 4), rank=2)
    bad_b.lora_B = nn.Linear(3, 4, bias=False)
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_param_groups(bad_b)
    layer = _pair_module()
    for bad, needle in [(dict(beta1=1.0), "beta1"), (dict(damping=-1.0), "damping"),
                        (dict(clip_threshold=0.0), "clip_threshold"),
                        (dict(statistics="exact"), "statistics"), (dict(lr=-1.0), "lr"),
                        (dict(beta2_decay=0.5), "beta2_decay"),
                        (dict(momentum_on="both"), "momentum_on must be one of 'gradients', "
                                                   "'steps', got 'both'")]:
        with pytest.raises(ValueError, match=needle):
            slimopt.AdaPreLoRA(layer, **bad)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(3, 3), rank=0)
    with pytest.raises(ValueError, match="every"):
        ReLoRA(layer, None, every=0)
