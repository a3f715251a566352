"""Randomized SVD (bases/randomized_svd.py) against the exact SVD: captured energy, subspace angle
and time, for GaLore's basis refresh on LLaMA gradient shapes.

Gradients (canonical d x k, d <= k): synthetic ``U diag(sigma) V^T`` with Haar ``U``, ``V`` and a
power law ``sigma_i = i^-alpha`` (alpha 0.5 and 1.0), on the 350M block's 1024 x 1024 and
1024 x 2736 and the 1B block's 2048 x 5461; and real gradients (q_proj and gate_proj) of a
one-block LLaMA with the 350M widths after a few AdamW steps on random tokens (needs
``transformers``). For ranks 256 and 512 and power iterations 0, 1, 2 (default oversample) plus
oversample 10 at q=2: median time of the exact top-r left singular vectors (one float32
``torch.linalg.svd`` in the tall orientation) and of the randomized ones, the captured energy
``||S_rand^T G||_F^2 / ||S_exact^T G||_F^2`` and the sine of the largest principal angle between
the two subspaces. One torch thread.

    python benchmarks/rsvd_error.py            # writes benchmarks/results/cpu/rsvd_error.{md,json}
    python benchmarks/rsvd_error.py --quick    # small shapes, one repeat, prints only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import report  # noqa: E402
from slimopt.optimizers.bases.randomized_svd import (  # noqa: E402
    default_oversample, exact_top_left_singular_vectors, top_left_singular_vectors)
from slimopt.optimizers.core.rng import Draws  # noqa: E402

SHAPES = [(1024, 1024), (1024, 2736), (2048, 5461)]
QUICK_SHAPES = [(256, 256), (256, 684)]
RANKS = (256, 512)
ALPHAS = (0.5, 1.0)
#: (oversample or None for the default, power iterations)
CONFIGS = [(None, 0), (None, 1), (None, 2), (10, 2)]


def haar(rows: int, cols: int, gen) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def power_law(shape, alpha: float, gen) -> torch.Tensor:
    """A float32 d x k matrix with Haar singular vectors and ``sigma_i = i^-alpha``."""
    d, k = shape
    sigma = torch.arange(1, d + 1, dtype=torch.float64) ** -alpha
    return ((haar(d, d, gen) * sigma) @ haar(k, d, gen).T).float()


def llama_gradients(hidden: int, steps: int = 3) -> dict:
    """Canonical (d <= k) float32 gradients of q_proj and gate_proj of a one-block LLaMA (350M
    widths: intermediate 2736) after ``steps`` AdamW steps on random tokens, or {} without
    transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("[rsvd_error] transformers missing: no real gradients", file=sys.stderr)
        return {}
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 2736 // 1024,
                         num_hidden_layers=1, num_attention_heads=hidden // 64,
                         num_key_value_heads=hidden // 64, vocab_size=2000,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, config.vocab_size, (4, 128))
    for _ in range(steps + 1):
        opt.zero_grad()
        model(input_ids=tokens, labels=tokens).loss.backward()
        if _ < steps:
            opt.step()
    layer = model.model.layers[0]
    grads = {"q_proj": layer.self_attn.q_proj.weight.grad, "gate_proj": layer.mlp.gate_proj.weight.grad}
    return {name: (g if g.shape[0] <= g.shape[1] else g.T).contiguous().float()
            for name, g in grads.items()}


def timed(fn, repeats: int):
    """(first result, median seconds over ``repeats`` calls)."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        out = result if out is None else out
    return out, statistics.median(times)


def compare(grad, exact, approx) -> dict:
    """Captured energy ratio and the sine of the largest principal angle, in float64."""
    g, e, a = grad.double(), exact.double(), approx.double()
    energy = float((a.T @ g).square().sum() / (e.T @ g).square().sum())
    sin_max = float(torch.linalg.matrix_norm(a - e @ (e.T @ a), ord=2))
    return dict(energy=energy, sin_max=sin_max)


def measure(name: str, grad: torch.Tensor, ranks, repeats: int) -> list[dict]:
    rows = []
    for rank in ranks:
        exact, t_exact = timed(lambda: exact_top_left_singular_vectors(grad, rank), repeats)
        for oversample, q in CONFIGS:
            over = default_oversample(rank) if oversample is None else oversample
            if oversample is not None and over == default_oversample(rank):
                continue  # the same as the default row
            approx, t_rand = timed(lambda: top_left_singular_vectors(
                grad, rank, Draws(0, rank, q), oversample=over, power_iterations=q), repeats)
            rows.append(dict(gradient=name, shape=list(grad.shape), rank=rank, oversample=over,
                             power_iterations=q, s_exact=t_exact, s_rand=t_rand,
                             **compare(grad, exact, approx)))
        print(f"[rsvd_error] {name} {tuple(grad.shape)} r={rank} done", file=sys.stderr, flush=True)
    return rows


def cases(shapes, quick: bool):
    """(name, gradient) pairs: power laws on every shape, then the real LLaMA gradients."""
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        for alpha in ALPHAS:
            yield f"power-law a={alpha}", power_law(shape, alpha, gen)
    for name, grad in llama_gradients(256 if quick else 1024).items():
        yield f"llama {name}", grad


def table(rows) -> str:
    lines = ["Top-r left singular vectors, randomized (float32, Draws Gaussian, QR after every "
             "product) against exact (float32 `torch.linalg.svd` of the tall orientation); "
             "1 torch thread, median times. energy = ||S_rand^T G||^2 / ||S_exact^T G||^2; "
             "sin = sine of the largest principal angle.", "",
             "| gradient | d x k | r | p | q | energy | sin max | exact s | rand s | rand / exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gradient']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank']} | "
                     f"{r['oversample']} | {r['power_iterations']} | {r['energy']:.5f} | "
                     f"{r['sin_max']:.3f} | {r['s_exact']:.3f} | {r['s_rand']:.3f} | "
                     f"{r['s_rand'] / r['s_exact']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, rank 32/64, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-1b", action="store_true", help="skip the 2048 x 5461 shape")
    parser.add_argument("--out", help="results folder (default benchmarks/results/cpu; "
                                      "--quick writes only with --out)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shapes = QUICK_SHAPES if args.quick else SHAPES[:2] if args.no_1b else SHAPES
    ranks, repeats = ((32, 64), 1) if args.quick else (RANKS, args.repeats)
    rows = [row for name, grad in cases(shapes, args.quick)
            for row in measure(name, grad, ranks, repeats)]
    text = table(rows)
    print(text)
    if args.out or not args.quick:
        info = report.stamp("cpu", argv)
        info["command"] = " ".join(["python benchmarks/rsvd_error.py"] + (
            sys.argv[1:] if argv is None else list(argv)))
        folder = args.out or report.out_dir("cpu")
        os.makedirs(folder, exist_ok=True)
        print("\n".join(report.write(folder, "rsvd_error", info, rows, text)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
