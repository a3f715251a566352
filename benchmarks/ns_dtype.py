"""ROOT's Newton-Schulz dtype: quality and speed of bfloat16 against float32.

Quality: the orthogonalized update in each dtype against the same iteration in float64, as a
relative Frobenius error, on LLaMA-shaped matrices (a 60M model's MLP and attention shapes and a
1B model's attention shape) with two spectra: a Gaussian matrix and a power law
(``sigma_i ~ i^-1``, closer to a real momentum). ROOT's fitted coefficients for each shape, 5
steps. Speed: median wall time of one orthogonalization in each dtype on the device.

    python benchmarks/ns_dtype.py                 # CPU; prints the table
    python benchmarks/ns_dtype.py --device cuda --out benchmarks/results/<gpu>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from slimopt.kernels import newton_schulz  # noqa: E402
from slimopt.kernels.ns_coefficients import coefficients_for  # noqa: E402

SHAPES = [(512, 1376), (512, 512), (2048, 2048)]
DTYPES = ("bfloat16", "float32")


def matrix(shape, spectrum: str, gen) -> torch.Tensor:
    m, n = shape
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if spectrum == "gaussian":
        return g
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    sigma = 1.0 / torch.arange(1, min(m, n) + 1, dtype=torch.float64)
    return (u * sigma) @ vh


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(shape, spectrum, device, repeats, gen) -> dict:
    coeffs = coefficients_for(*shape)
    x64 = matrix(shape, spectrum, gen).to(device)
    exact = newton_schulz(x64, coeffs, dtype=torch.float64)
    row = dict(shape=list(shape), spectrum=spectrum)
    x32 = x64.float()
    for name in DTYPES:
        dtype = getattr(torch, name)
        out = newton_schulz(x32, coeffs, dtype=dtype).double()
        row[f"error_{name}"] = float((out - exact).norm() / exact.norm())
        if spectrum == "gaussian":
            row[f"ms_{name}"] = 1e3 * median_seconds(
                lambda: newton_schulz(x32, coeffs, dtype=dtype), repeats)
    return row


def table(rows, device) -> str:
    lines = [f"ROOT's Newton-Schulz (5 steps, fitted coefficients) on {device}: relative error "
             "against float64, and median time of one call.", "",
             "| shape | spectrum | error bf16 | error fp32 | ms bf16 | ms fp32 | bf16 / fp32 time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        times = (f"{r['ms_bfloat16']:.2f} | {r['ms_float32']:.2f} | "
                 f"{r['ms_bfloat16'] / r['ms_float32']:.2f}") if "ms_float32" in r else "| |"
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['spectrum']} | "
                     f"{r['error_bfloat16']:.2e} | {r['error_float32']:.2e} | {times} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="folder for ns_dtype.json and ns_dtype.md")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        for spectrum in ("gaussian", "power-law"):
            rows.append(measure(shape, spectrum, args.device, args.repeats, gen))
            print(f"[ns_dtype] {shape} {spectrum} done", file=sys.stderr, flush=True)
    text = table(rows, args.device)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "ns_dtype.json"), "w") as f:
            json.dump(dict(device=args.device, torch=torch.__version__, rows=rows), f, indent=1)
        with open(os.path.join(args.out, "ns_dtype.md"), "w") as f:
            f.write("Command: `python benchmarks/ns_dtype.py`\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
