"""``optimizer.step()`` time of every slimopt optimizer and its peers, as a ratio to fused torch
AdamW measured in the same process.

What is timed: ``opt.step()`` alone, on fp32 weights whose ``.grad`` holds fixed random gradients
(seeded, scale 1e-3) assigned once -- no forward or backward pass. Workloads are the weights of
one LLaMA decoder block (``block-SIZE``, a ``LlamaDecoderLayer``) or a whole ``LlamaForCausalLM``
(``model-SIZE``, vocab 32000) with the GaLore paper's shapes (``benchmarks.memory.LLAMA_SHAPES``);
by default ``block-1b`` (~50M weights) and ``model-60m``. Every optimizer is built by name with
``slimopt.launch.registry.build_optimizer(name, module, lr=1e-3, rank=R)`` (the GaLore split:
projections get the matrix rule, the rest AdamW); the rank defaults to the paper's for the size
(60m: 128, 130m/350m: 256, 1b: 512, 7b: 1024).

Subspace refreshes: the low-rank methods change their basis every ``update_interval`` steps (an
SVD for GaLore/Fira/SN-SM, a random draw for APOLLO and GrassJump, a geodesic step for
GrassWalk). To see that cost without running 200 steps, they are built with a short measuring
interval M (``--steptime-measure-interval``, default 4); every library here (slimopt,
galore-torch, apollo-torch, fira) refreshes at the 0-based step ``k`` with ``k % M == 0``. Steps
are classified by that position, and the time per step is amortized over the nominal interval U
(``--steptime-interval``, default 200, the GaLore setting)::

    amortized = (refresh + (U - 1) * regular) / U

with the medians of the refresh and the regular steps. Methods without a refresh (AdamW, Muon,
ROOT, SubsetNorm, Adafactor) report amortized = regular (the median of all their steps).

Method: all optimizers of a workload are built on the same module (each with its own state) and
take one untimed warm-up step (state allocation, first basis). Then, for ``--steptime-repeats``
rounds, each optimizer in turn (the order rotates every round) runs M consecutive timed steps
(``time.perf_counter``; on CUDA with ``torch.cuda.synchronize()`` before and after each step),
so drift of a shared machine hits all of them alike. The ratio is amortized / fused AdamW's
amortized. torch's thread count is recorded.

    python -m benchmarks steptime                     # block-1b and model-60m (~15 min, 2 CPUs)
    python -m benchmarks steptime --quick             # one 60m block, < 90 s on 2 CPUs
    python -m benchmarks steptime --device cuda       # on a GPU
    python -m benchmarks steptime --steptime-workloads block-60m model-130m \\
        --steptime-optimizers adamw grasswalk galore --steptime-rank 256 --steptime-repeats 5

A peer whose package is not installed is skipped (noted on stderr and in the results). Writes
``steptime.json`` (rows and settings), ``steptime.md`` and ``steptime.png`` (amortized ratio per
optimizer, one panel per workload).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from slimopt.launch.registry import KNOWN, OPTIMIZERS, RANKED, build_optimizer

from . import report
from .memory import LLAMA_SHAPES, llama_on_meta

REFERENCE = "adamw-fused"
#: the GaLore paper's rank per model size
PAPER_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
WORKLOADS = [f"{kind}-{size}" for kind in ("block", "model") for size in LLAMA_SHAPES]
DEFAULT_WORKLOADS = ["block-1b", "model-60m"]
QUICK_WORKLOADS = ["block-60m"]
#: peer -> the package it comes from; everything in OPTIMIZERS is "slimopt"
PEER_LIBRARY = {"adamw": "torch", "adamw-fused": "torch", "muon": "torch",
                "galore": "galore-torch", "apollo": "apollo-torch", "apollo-mini": "apollo-torch",
                "fira": "fira", "adafactor": "torch-optimizer"}
DEFAULT_OPTIMIZERS = list(PEER_LIBRARY) + list(OPTIMIZERS)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_arguments(group) -> None:
    group.add_argument("--steptime-workloads", nargs="+", choices=WORKLOADS, default=None,
                       help=f"default {' '.join(DEFAULT_WORKLOADS)} "
                            f"({' '.join(QUICK_WORKLOADS)} with --quick)")
    group.add_argument("--steptime-optimizers", nargs="+", choices=sorted(KNOWN), default=None,
                       help="registry names (default: all); adamw-fused, the reference, is "
                            "always added")
    group.add_argument("--steptime-rank", type=_at_least(1), default=None,
                       help="rank of the low-rank methods (default: the GaLore paper's per "
                            "size: 60m 128, 1b 512)")
    group.add_argument("--steptime-repeats", type=_at_least(1), default=None,
                       help="interleaved rounds per workload, medians taken (default 5, "
                            "3 with --quick)")
    group.add_argument("--steptime-interval", type=_at_least(1), default=200,
                       help="update interval the refresh cost is amortized over (default 200)")
    group.add_argument("--steptime-measure-interval", type=_at_least(2), default=4,
                       help="update interval the optimizers are built with while measuring: "
                            "1 refresh and M-1 regular steps per round (default 4)")


def library(name: str) -> str:
    return PEER_LIBRARY.get(name, "slimopt")


def build_workload(name: str, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """``block-SIZE`` (one ``LlamaDecoderLayer``) or ``model-SIZE`` (``LlamaForCausalLM``), fp32,
    with seeded random weights and fixed random gradients in ``.grad``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
    kind, size = name.split("-", 1)
    model = llama_on_meta(size)
    module = model.model.layers[0] if kind == "block" else model
    module = module.to_empty(device=device)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    set_gradients(module, seed + 1)
    return module


def set_gradients(module: torch.nn.Module, seed: int = 1, scale: float = 1e-3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * scale).to(p.device)


def _timer(device):
    if torch.device(device).type == "cuda":
        def timed_step(opt):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            torch.cuda.synchronize()
            return time.perf_counter() - t0
    else:
        def timed_step(opt):
            t0 = time.perf_counter()
            opt.step()
            return time.perf_counter() - t0
    return timed_step


def measure(module, names, *, rank, interval=200, measure_interval=4, repeats=5, device="cpu",
            workload="custom", progress=lambda line: None):
    """Time ``opt.step()`` of each optimizer in ``names`` (plus ``adamw-fused``) on ``module``
    (parameters with ``.grad`` set). Returns ``(rows, skipped)``: one dict per optimizer with
    median ``regular_ms``, ``refresh_ms`` (None without a refresh), ``amortized_ms`` over
    ``interval`` and ``ratio_to_fused_adamw``; ``skipped`` maps a name to why it did not run."""
    if repeats < 1 or interval < 1 or measure_interval < 2:
        raise ValueError(f"need repeats >= 1, interval >= 1 and measure_interval >= 2; got "
                         f"{repeats}, {interval}, {measure_interval}")
    names = [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]
    optimizers, skipped = {}, {}
    for name in names:
        options = {"update_interval": measure_interval} if name in RANKED else {}
        try:
            torch.manual_seed(0)
            optimizers[name] = build_optimizer(name, module, lr=1e-3, rank=rank, **options)
        except ValueError as err:
            if "pip install" not in str(err):
                raise
            skipped[name] = str(err)
            progress(f"[steptime] {workload}: skipping {name}: {err}")
    timed_step = _timer(device)
    for opt in optimizers.values():
        timed_step(opt)  # warm-up: lazy state, first basis (0-based step 0)
    times = {name: ([], []) for name in optimizers}  # (regular, refresh)
    order = list(optimizers)
    for r in range(repeats):
        t0 = time.perf_counter()
        for name in order[r % len(order):] + order[:r % len(order)]:
            # 0-based steps r*M+1 .. (r+1)*M: M-1 regular ones, the last one a refresh
            for k in range(r * measure_interval + 1, (r + 1) * measure_interval + 1):
                refresh = name in RANKED and k % measure_interval == 0
                times[name][refresh].append(timed_step(optimizers[name]) * 1e3)
        progress(f"[steptime] {workload}: round {r + 1}/{repeats} "
                 f"({time.perf_counter() - t0:.1f} s)")
    n_params = sum(p.numel() for p in module.parameters())
    rows = []
    for name, (regular, refreshes) in times.items():
        if refreshes:
            regular_ms, refresh_ms = statistics.median(regular), statistics.median(refreshes)
            amortized = (refresh_ms + (interval - 1) * regular_ms) / interval
        else:
            regular_ms, refresh_ms = statistics.median(regular), None
            amortized = regular_ms
        rows.append(dict(workload=workload, optimizer=name, library=library(name),
                         rank=rank if name in RANKED else None, params=n_params,
                         regular_ms=regular_ms, refresh_ms=refresh_ms, amortized_ms=amortized))
    reference = next(row["amortized_ms"] for row in rows if row["optimizer"] == REFERENCE)
    for row in rows:
        row["ratio_to_fused_adamw"] = row["amortized_ms"] / reference
    rows.sort(key=lambda row: row["ratio_to_fused_adamw"])
    del optimizers
    return rows, skipped


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def markdown(rows, skipped, settings) -> str:
    parts = [f"`optimizer.step()` time (ms, median of {settings['repeats']} interleaved rounds), "
             f"refresh cost amortized over U = {settings['interval']} steps; ratio = amortized / "
             f"fused torch AdamW in the same process (lower is faster). "
             f"{settings['device']}, {settings['torch_threads']} torch threads."]
    for workload in dict.fromkeys(row["workload"] for row in rows):
        mine = [row for row in rows if row["workload"] == workload]
        ranks = sorted({row["rank"] for row in mine if row["rank"] is not None})
        parts.append(f"### {workload} ({mine[0]['params'] / 1e6:.1f}M parameters"
                     + (f", rank {ranks[0]}" if ranks else "") + ")")
        lines = ["| optimizer | library | regular ms | refresh ms | amortized ms "
                 "| × fused AdamW |", "|---|---|---:|---:|---:|---:|"]
        for row in mine:
            lines.append(f"| {row['optimizer']} | {row['library']} | {_ms(row['regular_ms'])} "
                         f"| {_ms(row['refresh_ms'])} | {_ms(row['amortized_ms'])} "
                         f"| {row['ratio_to_fused_adamw']:.2f} |")
        parts.append("\n".join(lines))
        gone = skipped.get(workload, {})
        if gone:
            parts.append("Skipped: " + "; ".join(f"{n} ({why})" for n, why in gone.items()))
    return "\n\n".join(parts) + "\n"


def figure(rows):
    plt = report.pyplot()
    if plt is None or not rows:
        return None
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    height = max(len([r for r in rows if r["workload"] == w]) for w in workloads)
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 0.32 * height + 1.5),
                             squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        mine = [row for row in rows if row["workload"] == workload][::-1]  # fastest on top
        ratios = [row["ratio_to_fused_adamw"] for row in mine]
        colours = ["tab:orange" if row["library"] == "slimopt" else "tab:blue" for row in mine]
        ax.barh([row["optimizer"] for row in mine], ratios, color=colours)
        ax.axvline(1.0, color="black", linewidth=1)
        if max(ratios) / min(ratios) > 20:
            ax.set_xscale("log")
        for y, ratio in enumerate(ratios):
            ax.text(ratio, y, f" {ratio:.2f}", va="center", fontsize=7)
        ax.set_title(workload)
        ax.set_xlabel("amortized step time / fused AdamW")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:orange", "tab:blue")]
    fig.legend(handles, ["slimopt", "peers"], loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def run(args, folder, info) -> list[str]:
    workloads = args.steptime_workloads or (QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    names = args.steptime_optimizers or DEFAULT_OPTIMIZERS
    repeats = args.steptime_repeats or (3 if args.quick else 5)
    settings = dict(device=args.device, torch_threads=torch.get_num_threads(), repeats=repeats,
                    interval=args.steptime_interval,
                    measure_interval=args.steptime_measure_interval, lr=1e-3,
                    gradient_scale=1e-3, dtype="float32", reference=REFERENCE)
    rows, skipped = [], {}
    for workload in workloads:
        rank = args.steptime_rank or PAPER_RANK[workload.split("-", 1)[1]]
        t0 = time.perf_counter()
        module = build_workload(workload, args.device)
        print(f"[steptime] {workload}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M "
              f"parameters, rank {rank}, {len(names)} optimizers", file=sys.stderr)
        mine, gone = measure(module, names, rank=rank, interval=args.steptime_interval,
                             measure_interval=args.steptime_measure_interval, repeats=repeats,
                             device=args.device, workload=workload,
                             progress=lambda line: print(line, file=sys.stderr))
        rows += mine
        skipped[workload] = gone
        del module
        print(f"[steptime] {workload}: done in {time.perf_counter() - t0:.0f} s; "
              + ", ".join(f"{r['optimizer']} {r['ratio_to_fused_adamw']:.2f}" for r in mine),
              file=sys.stderr)
    data = dict(settings=settings, rows=rows, skipped=skipped)
    return report.write(folder, "steptime", info, data, markdown(rows, skipped, settings),
                        figure(rows))
