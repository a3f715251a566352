"""The Triton kernels against torch: correctness on this device and, on a CUDA GPU, speed.

    python benchmarks/kernels.py                            # GPU: check, then time everything
    python benchmarks/kernels.py --sizes 1024 4096 --shapes 4096x11008 --repeats 50
    TRITON_INTERPRET=1 python benchmarks/kernels.py         # CPU: the check only, small sizes

Check: every Triton kernel (projection, back-projection, fused projection + Adam moments,
symmetric Gram, Newton-Schulz) against a float64 torch result from the same inputs, in float32 and
bfloat16, on odd sizes. Newton-Schulz must be about as close to float64 as torch's own
``newton_schulz_torch`` in the same dtype.

Timing (CUDA only): CUDA events around each call, after warm-up calls (which also compile), the
median of the repeats. Three contenders per size: the Triton kernels, the torch reference, and a
plain ``torch.matmul`` of the same size and dtype measured in the same run (the "ceiling").

FLOPs. Newton-Schulz on X (m x n after the transpose, m <= n), per step:
- dense count, 4 m^2 n + 2 m^3: X X^T (2 m^2 n), A A (2 m^3), P X (2 m^2 n). torch does this.
- executed by Triton: X X^T and A A^T only on the lower-triangle tiles, t (t + 1) / 2 of t^2 with
  t = ceil(m / 128), so f (2 m^2 n + 2 m^3) + 2 m^2 n with f = (t + 1) / (2 t), about 3 m^2 n + m^3.
"TFLOP/s dense" divides the dense count by the time (equal speed, equal number, whichever
algorithm); "TFLOP/s executed" divides each algorithm's own count, and "of ceiling" is that over
the matmul ceiling's TFLOP/s. The ceiling for Newton-Schulz is an (m x m) @ (m x n) matmul, for a
projection the same product as the projection. Projection FLOPs: 2 d r k (elementwise work of the
moment update not counted). Results go to benchmarks/results/<device>/kernels.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys

import torch

from slimopt.kernels import MUON_COEFFICIENTS, newton_schulz_torch
from slimopt.kernels.dispatch import interpreting, triton_available

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Relative Frobenius error vs float64 for one product: float32 (IEEE) is summation order only,
# bfloat16 at most a rounding or two (2^-9 each).
PRODUCT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
NS_SLACK = 1.5  # Triton's Newton-Schulz error may be this many times torch's, same dtype


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check(device: torch.device, small: bool, progress=print) -> list[dict]:
    """Each Triton kernel vs float64 torch on ``device``; rows with the errors and a verdict."""
    from slimopt.kernels import triton_newton_schulz as tns
    from slimopt.kernels import triton_projection as tp
    d, r, k = (33, 17, 70) if small else (1031, 129, 3001)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    rows = []
    for dtype in DTYPES.values():
        basis, grad, coeffs = (randn(d, r, dtype=dtype), randn(d, k, dtype=dtype),
                               randn(r, k, dtype=dtype))
        m1, m2 = randn(r, k, dtype=torch.float32), randn(r, k, dtype=torch.float32).abs()
        want_r = basis.double().T @ grad.double()
        want_m1 = m1.double().lerp(want_r, 0.1)
        want_m2 = m2.mul(0.999).double() + 0.001 * want_r ** 2
        got_r = tp.project_adam_moments_(basis, grad, m1, m2, 0.9, 0.999)
        wide = grad[:, : min(k, 2 * d)]  # a slice: rows not contiguous
        x = wide.T  # a tall, transposed view
        cases = [("project", tp.project(basis, grad), want_r),
                 ("project_back", tp.project_back(basis, coeffs), basis.double() @ coeffs.double()),
                 ("project_adam_moments_ R", got_r, want_r),
                 ("project_adam_moments_ exp_avg", m1, want_m1),
                 ("project_adam_moments_ exp_avg_sq", m2, want_m2),
                 ("gram (symmetric)", tns.gram(wide), wide.double() @ wide.double().T)]
        for name, got, want in cases:
            err = relative_error(got, want)
            rows.append(dict(kernel=name, dtype=str(dtype).replace("torch.", ""),
                             error=err, bound=PRODUCT_RTOL[dtype], ok=err < PRODUCT_RTOL[dtype]))
        steps = [MUON_COEFFICIENTS] * (2 if small else 5)
        want = newton_schulz_torch(x.double(), steps, dtype=torch.float64)
        err_torch = relative_error(newton_schulz_torch(x, steps, dtype=dtype), want)
        err = relative_error(tns.newton_schulz(x, steps, dtype=dtype), want)
        bound = NS_SLACK * err_torch + 1e-6
        rows.append(dict(kernel=f"newton_schulz ({len(steps)} steps)",
                         dtype=str(dtype).replace("torch.", ""), error=err, bound=bound,
                         ok=err < bound, torch_error=err_torch))
    for row in rows:
        progress(f"[check] {row['kernel']:34s} {row['dtype']:9s} error {row['error']:.2e} "
                 f"(bound {row['bound']:.1e}) {'ok' if row['ok'] else 'FAIL'}")
    return rows


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event timings, after ``warmup``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def ns_flops(m: int, n: int, steps: int, block: int) -> tuple[float, float]:
    """(dense, executed-by-the-symmetric-kernels) FLOPs of ``steps`` Newton-Schulz steps, with
    the Gram kernels' tiles ``block`` wide."""
    m, n = min(m, n), max(m, n)
    tiles = math.ceil(m / block)
    frac = (tiles + 1) / (2 * tiles)
    dense = 4 * m * m * n + 2 * m ** 3
    symmetric = frac * (2 * m * m * n + 2 * m ** 3) + 2 * m * m * n
    return steps * dense, steps * symmetric


def time_newton_schulz(shapes, dtype, steps, warmup, repeats, progress=print,
                       device="cuda") -> list[dict]:
    from slimopt.kernels import triton_newton_schulz as tns
    from slimopt.kernels.triton_projection import launch_config
    rows = []
    coefficients = [MUON_COEFFICIENTS] * steps
    for rows_, cols in shapes:
        grad = torch.randn(rows_, cols, device=device, dtype=dtype)
        m, n = min(rows_, cols), max(rows_, cols)
        a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, n, device=device,
                                                                          dtype=dtype)
        ceiling_ms = cuda_time(lambda: torch.matmul(a, b), warmup, repeats)
        ceiling = 2 * m * m * n / ceiling_ms / 1e9
        dense, symmetric = ns_flops(m, n, steps, launch_config("matmul", dtype)["BLOCK_M"])
        base = dict(op=f"newton_schulz ({steps} steps)", shape=f"{rows_}x{cols}",
                    ceiling_ms=ceiling_ms, ceiling_tflops=ceiling)
        timed = {"torch": (lambda: newton_schulz_torch(grad, coefficients, dtype=dtype), dense),
                 "triton": (lambda: tns.newton_schulz(grad, coefficients, dtype=dtype),
                            symmetric)}
        for impl, (fn, executed) in timed.items():
            ms = cuda_time(fn, warmup, repeats)
            rows.append(dict(base, impl=impl, ms=ms, tflops_dense=dense / ms / 1e9,
                             tflops_executed=executed / ms / 1e9,
                             of_ceiling=executed / ms / 1e9 / ceiling))
            progress(f"[time] {rows[-1]['op']} {rows[-1]['shape']} {impl}: {ms:.3f} ms")
        del grad, a, b
    return rows


def time_projection(shapes, dtype, rank, warmup, repeats, progress=print,
                    device="cuda") -> list[dict]:
    from slimopt.kernels import triton_projection as tp
    rows = []
    for d, k in shapes:
        r = min(rank or d // 4, d)
        basis = torch.randn(d, r, device=device, dtype=dtype)
        grad = torch.randn(d, k, device=device, dtype=dtype)
        coeffs = torch.randn(r, k, device=device, dtype=dtype)
        m1 = torch.zeros(r, k, device=device)
        m2 = torch.zeros(r, k, device=device)
        left, right = torch.randn(r, d, device=device, dtype=dtype), grad
        ceiling_ms = cuda_time(lambda: torch.matmul(left, right), warmup, repeats)
        flops = 2 * d * r * k
        ceiling = flops / ceiling_ms / 1e9

        def torch_moments():
            projected = (basis.T @ grad).float()
            m1.lerp_(projected, 0.1)
            m2.mul_(0.999).addcmul_(projected, projected, value=0.001)

        ops = {"project": {"torch": lambda: basis.T @ grad,
                           "triton": lambda: tp.project(basis, grad)},
               "project_back": {"torch": lambda: basis @ coeffs,
                                "triton": lambda: tp.project_back(basis, coeffs)},
               "project + Adam moments": {
                   "torch": torch_moments,
                   "triton": lambda: tp.project_adam_moments_(basis, grad, m1, m2, 0.9, 0.999)}}
        for op, impls in ops.items():
            for impl, fn in impls.items():
                ms = cuda_time(fn, warmup, repeats)
                rows.append(dict(op=op, shape=f"{d}x{k}", rank=r, impl=impl, ms=ms,
                                 tflops_dense=flops / ms / 1e9, tflops_executed=flops / ms / 1e9,
                                 of_ceiling=flops / ms / 1e9 / ceiling, ceiling_ms=ceiling_ms,
                                 ceiling_tflops=ceiling))
                progress(f"[time] {op} {d}x{k} rank {r} {impl}: {ms:.3f} ms")
    return rows


def markdown(rows: list[dict], checks: list[dict]) -> str:
    torch_ms = {(r["op"], r["shape"]): r["ms"] for r in rows if r["impl"] == "torch"}
    lines = ["| op | shape | rank | impl | ms | TFLOP/s dense | TFLOP/s executed | of ceiling "
             "| vs torch | ceiling (matmul) |", "|" + "---|" * 10]
    for r in rows:
        speedup = torch_ms[(r["op"], r["shape"])] / r["ms"]
        lines.append(f"| {r['op']} | {r['shape']} | {r.get('rank', '-')} | {r['impl']} "
                     f"| {r['ms']:.3f} | {r['tflops_dense']:.1f} | {r['tflops_executed']:.1f} "
                     f"| {r['of_ceiling']:.0%} | {speedup:.2f}x "
                     f"| {r['ceiling_ms']:.3f} ms, {r['ceiling_tflops']:.1f} TFLOP/s |")
    lines += ["", "| check | dtype | relative error | bound | |", "|---|---|---|---|---|"]
    lines += [f"| {c['kernel']} | {c['dtype']} | {c['error']:.2e} | {c['bound']:.1e} "
              f"| {'ok' if c['ok'] else 'FAIL'} |" for c in checks]
    return "\n".join(lines)


def write_results(out: str, command: str, device: str, dtype: str, rows: list[dict],
                  checks: list[dict]) -> str:
    """``out``/kernels.md (header + tables) and ``out``/kernels.json; returns the tables."""
    import triton
    header = (f"Triton kernels vs torch on {device} ({dtype}; torch {torch.__version__}, "
              f"triton {triton.__version__}). Command: `{command}`\n\n"
              "Median of CUDA-event timings. TFLOP/s dense: the dense Newton-Schulz count "
              "(4 m^2 n + 2 m^3 per step) over the time, for every implementation; executed: "
              "each algorithm's own count (Triton's symmetric Gram products do only the lower "
              "triangle of 128-wide tiles, about 3 m^2 n + m^3 per step); of ceiling: executed "
              "TFLOP/s over a plain torch.matmul of the same size measured in this run "
              "((m x m) @ (m x n) for Newton-Schulz, the projection's own product otherwise).\n\n")
    table = markdown(rows, checks)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels.md"), "w") as f:
        f.write(header + table + "\n")
    with open(os.path.join(out, "kernels.json"), "w") as f:
        json.dump({"command": command, "device": device, "dtype": dtype,
                   "torch": torch.__version__, "triton": triton.__version__,
                   "flops": {"newton_schulz_dense": "steps * (4 m^2 n + 2 m^3)",
                             "newton_schulz_executed_triton":
                                 "steps * (f (2 m^2 n + 2 m^3) + 2 m^2 n), f = (t+1)/(2t), "
                                 "t = ceil(m/128)",
                             "projection": "2 d r k"},
                   "checks": checks, "rows": rows}, f, indent=1)
    return table


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def parse_shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match[1]), int(match[2])) < 1:
        raise argparse.ArgumentTypeError(f"a shape is ROWSxCOLS with positive sizes, got {text!r}")
    return int(match[1]), int(match[2])


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=positive, default=[1024, 2048, 4096, 8192],
                        help="square sizes to time (default: 1024 2048 4096 8192)")
    parser.add_argument("--shapes", nargs="*", type=parse_shape, default=[(4096, 11008)],
                        metavar="ROWSxCOLS", help="non-square shapes to time (default 4096x11008)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="working dtype of the timed kernels (default bfloat16)")
    parser.add_argument("--steps", type=positive, default=5, help="Newton-Schulz steps (5)")
    parser.add_argument("--rank", type=positive, default=None,
                        help="projection rank (default: a quarter of the rows)")
    parser.add_argument("--warmup", type=positive, default=5, help="untimed calls first (5)")
    parser.add_argument("--repeats", type=positive, default=30, help="timed calls (median; 30)")
    parser.add_argument("--check-only", action="store_true", help="skip the timing")
    parser.add_argument("--out", default=None,
                        help="folder for kernels.md and kernels.json "
                             "(default benchmarks/results/<device-name>)")
    args = parser.parse_args(argv)
    if not triton_available():
        print("triton is not installed (pip install triton): nothing to benchmark",
              file=sys.stderr)
        return 1
    progress = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if interpreting():  # kernels run in numpy: check small sizes on the CPU, time nothing
        checks = check(torch.device("cpu"), small=True, progress=progress)
        print(f"{sum(c['ok'] for c in checks)}/{len(checks)} checks passed under Triton's "
              "interpreter; timing needs a CUDA GPU and TRITON_INTERPRET unset")
        return 0 if all(c["ok"] for c in checks) else 1
    if not torch.cuda.is_available():
        print("no CUDA GPU: timing needs one. For the correctness check alone, run under "
              "Triton's interpreter: TRITON_INTERPRET=1 python benchmarks/kernels.py")
        return 0
    checks = check(torch.device("cuda"), small=False, progress=progress)
    rows = []
    if not args.check_only:
        dtype = DTYPES[args.dtype]
        shapes = [(s, s) for s in args.sizes] + list(args.shapes)
        rows = time_newton_schulz(shapes, dtype, args.steps, args.warmup, args.repeats, progress)
        rows += time_projection(shapes, dtype, args.rank, args.warmup, args.repeats, progress)
    command = "python benchmarks/kernels.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    device = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   slug(device))
    table = write_results(out, command.strip(), device, args.dtype, rows, checks)
    print(table)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
