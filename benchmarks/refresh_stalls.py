"""Refresh stalls: the slowest ``optimizer.step()`` of an interval against the typical one.

A low-rank method refreshes its bases every ``update_interval`` steps. All at once (the papers'
schedule, and every peer's), the refresh step takes one SVD per matrix, tens of times a regular
step; with ``stagger_refresh=True`` each matrix refreshes at its own offset in the interval, and
with ``svd="randomized"`` each refresh is cheaper. This runs one whole interval of steps (after
the untimed first step, which finds every first basis) for each configuration and reports the
median step, the slowest, and their ratio, on fixed random gradients (as
``benchmarks.steptime``: no forward or backward pass), one torch thread on the CPU.

    python benchmarks/refresh_stalls.py                 # model-60m, interval 200 (~10 min)
    python benchmarks/refresh_stalls.py --quick         # block-60m, interval 8, seconds
    python benchmarks/refresh_stalls.py --workload block-350m --interval 64 --rank 256

Configurations are registry names or variants ``NAME:key=value,...`` (``benchmarks.steptime``);
galore-torch (``galore``) is the peer's all-at-once schedule for reference. Writes
``refresh_stalls.{json,md}`` under ``--out`` (default ``benchmarks/results/<device>``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

if __package__ in (None, ""):  # run as a script: import from the repository root, and keep
    # benchmarks/ itself off the path (its kernels.py would shadow the `kernels` package)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.dirname(here)] + [p for p in sys.path if os.path.abspath(p) != here]

from benchmarks import report  # noqa: E402
from benchmarks.steptime import (PAPER_RANK, _timer, build_workload, library,  # noqa: E402
                                  split_variant)
from slimopt.launch.registry import build_optimizer  # noqa: E402

CONFIGS = ["galore", "galore-slimopt", "galore-slimopt:stagger_refresh=True",
           "galore-slimopt:stagger_refresh=True,svd=randomized", "grasswalk",
           "grasswalk:stagger_refresh=True"]


def run_config(module, label: str, *, rank: int, interval: int, device: str) -> dict:
    """One interval of timed steps (after an untimed first step) of optimizer ``label``."""
    name, options = split_variant(label)
    torch.manual_seed(0)
    opt = build_optimizer(name, module, lr=1e-3, rank=rank, update_interval=interval, **options)
    timed_step = _timer(device)
    opt.step()
    times = [timed_step(opt) * 1e3 for _ in range(interval)]
    median = statistics.median(times)
    return dict(optimizer=label, library=library(label), median_ms=median, max_ms=max(times),
                max_over_median=max(times) / median,
                steps_over_2x=sum(t > 2 * median for t in times), steps=len(times))


def markdown(rows, settings) -> str:
    lines = [f"One interval of {settings['interval']} steps after the first, "
             f"{settings['workload']} ({settings['params'] / 1e6:.1f}M parameters, "
             f"{settings['matrices']} low-rank matrices, rank {settings['rank']}), "
             f"{settings['threads']} torch thread(s) on {settings['device']}: the median and the "
             "slowest `optimizer.step()`.", "",
             "| configuration | library | median ms | slowest ms | slowest / median "
             "| steps over 2x median |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['library']} | {r['median_ms']:.0f} "
                     f"| {r['max_ms']:.0f} | {r['max_over_median']:.2f} "
                     f"| {r['steps_over_2x']} / {r['steps']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None, help="block-SIZE or model-SIZE "
                        "(default model-60m; block-60m with --quick)")
    parser.add_argument("--interval", type=int, default=None,
                        help="update_interval (default 200; 8 with --quick)")
    parser.add_argument("--rank", type=int, default=None, help="default: the GaLore paper's")
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="folder (default benchmarks/results/<device>; "
                        "--quick writes nothing unless given)")
    args = parser.parse_args(argv)
    workload = args.workload or ("block-60m" if args.quick else "model-60m")
    interval = args.interval or (8 if args.quick else 200)
    rank = args.rank or (16 if args.quick else PAPER_RANK[workload.split("-", 1)[1]])
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    module = build_workload(workload, args.device)
    matrices = sum(p.dim() == 2 and min(p.shape) > rank for n, p in module.named_parameters()
                   if "proj" in n)
    settings = dict(workload=workload, interval=interval, rank=rank, device=args.device,
                    threads=torch.get_num_threads(), matrices=matrices,
                    params=sum(p.numel() for p in module.parameters()))
    rows = []
    for label in args.configs:
        try:
            rows.append(run_config(module, label, rank=rank, interval=interval,
                                   device=args.device))
        except ValueError as err:
            if "pip install" not in str(err):
                raise
            print(f"[stalls] skipping {label}: {err}", file=sys.stderr)
            continue
        r = rows[-1]
        print(f"[stalls] {label}: median {r['median_ms']:.0f} ms, slowest {r['max_ms']:.0f} ms "
              f"({r['max_over_median']:.2f}x)", file=sys.stderr)
    table = markdown(rows, settings)
    print(table)
    if args.quick and args.out is None:
        return []
    info = report.stamp(args.device, argv if argv is not None else sys.argv[1:])
    info["command"] = info["command"].replace("python -m benchmarks",
                                              "python benchmarks/refresh_stalls.py")
    folder = args.out or report.out_dir(args.device)
    os.makedirs(folder, exist_ok=True)
    return report.write(folder, "refresh_stalls", info, dict(settings=settings, rows=rows), table)


if __name__ == "__main__":
    main()
