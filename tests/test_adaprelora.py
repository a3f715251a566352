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
