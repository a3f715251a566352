"""``optimizer.step()`` time of every slimopt optimizer and its peers, as a ratio to fused torch
AdamW measured in the same process.

What is timed: ``opt.step()`` alone, on fp32 weights whose ``.grad`` holds fixed random gradients
(seeded, scale 1e-3) assigned once -- no forward or backward pass. Workloads are the weights of
one LLaMA decoder block (``block-SIZE``, a ``LlamaDecoderLayer``) or a whole ``LlamaForCausalLM``
(``model-SIZE``, vocab 32000) with the GaLore paper's shapes (``benchmarks.memory.LLAMA_SHAPES``).
Defaults: ``block-1b`` (~50M weights) and ``model-60m`` on a GPU; on the CPU ``block-350m`` and
``model-60m``, because one 1B block's SVD refreshes take 70-120 s per step on one core, so the
1B block alone would take over half an hour (``--steptime-workloads block-1b`` runs it anyway).
Every optimizer is built by name with ``slimopt.launch.registry.build_optimizer(name, module,
lr=1e-3, rank=R)`` (the GaLore split: projections get the matrix rule, the rest AdamW); the rank
defaults to the GaLore paper's for the size (60m: 128, 130m/350m: 256, 1b: 512, 7b: 1024).

Subspace refreshes: the low-rank methods change their basis every ``update_interval`` steps (an
SVD for GaLore/Fira/SARA/SN-SM, a random draw for APOLLO and GrassJump, a geodesic step for
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
amortized. On the CPU torch runs with one thread by default (``--steptime-threads``): on a
shared machine two threads wait on each other and an SVD can take 5-10x longer, unevenly.
An optimizer whose warm-up step runs over ``--steptime-max-step`` seconds (30; 5 with
``--quick``) is stopped there and reported as over the limit, not timed -- on a CPU without
bf16 matrix units that is torch Muon and ROOT, whose Newton-Schulz runs in bfloat16.

    python -m benchmarks steptime                     # CPU: block-350m, model-60m (~11 min)
    python -m benchmarks steptime --quick             # one 60m block, < 90 s on 2 CPUs
    python -m benchmarks steptime --device cuda       # block-1b, model-60m on a GPU
    python -m benchmarks steptime --steptime-workloads block-60m model-130m \\
        --steptime-optimizers adamw grasswalk galore --steptime-rank 256 --steptime-repeats 5
    python -m benchmarks steptime --steptime-optimizers galore-slimopt \\
        galore-slimopt:svd=randomized grassjump grassjump:store_basis=True

A *variant* ``NAME:key=value,key=value`` builds optimizer ``NAME`` with those options (values are
Python literals, else strings) and is reported under that label.

A peer whose package is not installed is skipped (noted on stderr and in the results). Writes
``steptime.json`` (rows, skipped optimizers, settings), ``steptime.md`` and ``steptime.png``
(amortized ratio per optimizer, one panel per workload).
"""
from __future__ import annotations

import argparse
import ast
import signal
import statistics
import sys
import threading
import time
from contextlib import contextmanager

import torch

from slimopt.launch import records
from slimopt.launch.registry import KNOWN, RANKED, build_optimizer

from . import report
from .memory import LLAMA_SHAPES, llama_on_meta

REFERENCE = "adamw-fused"
#: the GaLore paper's rank per model size
PAPER_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
WORKLOADS = [f"{kind}-{size}" for kind in ("block", "model") for size in LLAMA_SHAPES]
DEFAULT_WORKLOADS = {"cuda": ["block-1b", "model-60m"], "cpu": ["block-350m", "model-60m"],
                     "quick": ["block-60m"]}
#: the peers first, then slimopt's (``slimopt.launch.records``)
DEFAULT_OPTIMIZERS = [m.name for m in sorted(records.in_suite(records.STEPTIME),
                                             key=lambda m: not m.is_peer)]


def _at_least(minimum: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_arguments(group) -> None:
    group.add_argument("--steptime-workloads", nargs="+", choices=WORKLOADS, default=None,
                       help="block-SIZE or model-SIZE (default: block-1b model-60m on CUDA, "
                            "block-350m model-60m on the CPU, block-60m with --quick)")
    group.add_argument("--steptime-optimizers", nargs="+", type=_variant, default=None,
                       help="registry names, or variants NAME:key=value,... (default: all); "
                            "adamw-fused, the reference, is always added")
    group.add_argument("--steptime-rank", type=_at_least(1), default=None,
                       help="rank of the low-rank methods (default: the GaLore paper's per "
                            "size: 60m 128, 350m 256, 1b 512)")
    group.add_argument("--steptime-repeats", type=_at_least(1), default=None,
                       help="interleaved rounds per workload, medians taken (default 3, "
                            "2 with --quick)")
    group.add_argument("--steptime-interval", type=_at_least(1), default=200,
                       help="update interval the refresh cost is amortized over (default 200)")
    group.add_argument("--steptime-measure-interval", type=_at_least(2), default=4,
                       help="update interval the optimizers are built with while measuring: "
                            "1 refresh and M-1 regular steps per round (default 4)")
    group.add_argument("--steptime-threads", type=_at_least(1), default=None,
                       help="torch threads on the CPU (default 1; CUDA runs leave torch's)")
    group.add_argument("--steptime-max-step", type=_at_least(0.0, float), default=None,
                       help="seconds a warm-up step may take before the optimizer is dropped "
                            "as over the limit (default 30, 5 with --quick; 0: no limit)")


def library(name: str) -> str:
    return records.BY_NAME[split_variant(name)[0]].library


def split_variant(label: str) -> tuple[str, dict]:
    """``"NAME:key=value,..."`` -> ``(NAME, {key: value})`` (values read as Python literals where
    they parse, else kept as strings); a plain name has no options."""
    name, _, spec = label.partition(":")
    options = {}
    for item in filter(None, spec.split(",")):
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ValueError(f"variant {label!r}: expected NAME:key=value[,key=value]")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return name, options


def _variant(text: str) -> str:
    """argparse type: a registry name, or a variant of one."""
    name, _ = split_variant(text)
    if name not in KNOWN:
        raise argparse.ArgumentTypeError(f"unknown optimizer {name!r}; known: {sorted(KNOWN)}")
    return text


def build_workload(name: str, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """``block-SIZE`` (one ``LlamaDecoderLayer``) or ``model-SIZE`` (``LlamaForCausalLM``), fp32,
    with seeded random weights and fixed random gradients in ``.grad``."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known: {WORKLOADS}")
    kind, size = name.split("-", 1)
    model = llama_on_meta(size)
    module = (model.model.layers[0] if kind == "block" else model).to_empty(device=device)
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


class OverLimit(Exception):
    pass


@contextmanager
def _time_limit(seconds):
    """Raise ``OverLimit`` in the main thread after ``seconds`` (between torch calls: a long
    kernel finishes first); no limit if ``seconds`` is falsy or there is no SIGALRM."""
    if not seconds or not hasattr(signal, "SIGALRM") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise OverLimit
    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _timer(device):
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def timed_step(opt):
        sync()
        t0 = time.perf_counter()
        opt.step()
        sync()
        return time.perf_counter() - t0
    return timed_step


def _build(names, module, rank, measure_interval, workload, progress):
    optimizers, skipped = {}, {}
    for name in names:
        base, options = split_variant(name)
        if base in RANKED:
            options["update_interval"] = measure_interval
        try:
            torch.manual_seed(0)
            optimizers[name] = build_optimizer(base, module, lr=1e-3, rank=rank, **options)
        except ValueError as err:
            if "pip install" not in str(err):
                raise
            skipped[name] = str(err)
            progress(f"[steptime] {workload}: skipping {name}: {err}")
    return optimizers, skipped


def measure(module, names, *, rank, interval=200, measure_interval=4, repeats=3, device="cpu",
            max_step=None, workload="custom", progress=lambda line: None):
    """Time ``opt.step()`` of each optimizer in ``names`` (plus ``adamw-fused``) on ``module``
    (parameters with ``.grad`` set). Returns ``(rows, skipped)``: one dict per optimizer with
    median ``regular_ms``, ``refresh_ms`` (None without a refresh), ``amortized_ms`` over
    ``interval`` and ``ratio_to_fused_adamw``, fastest first; ``skipped`` maps a name to why it
    was not timed (package missing, or its warm-up step ran over ``max_step`` seconds)."""
    if repeats < 1 or interval < 1 or measure_interval < 2:
        raise ValueError(f"need repeats >= 1, interval >= 1 and measure_interval >= 2; got "
                         f"{repeats}, {interval}, {measure_interval}")
    names = [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]
    optimizers, skipped = _build(names, module, rank, measure_interval, workload, progress)
    timed_step = _timer(device)
    for name in list(optimizers):  # warm-up: lazy state, first basis (0-based step 0)
        try:
            with _time_limit(max_step):
                seconds = timed_step(optimizers[name])
        except OverLimit:
            if name == REFERENCE:
                raise RuntimeError(f"{REFERENCE} ran over the {max_step} s step limit") from None
            del optimizers[name]
            skipped[name] = f"one step takes over the {max_step:g} s limit"
            progress(f"[steptime] {workload}: {name} stopped: its step takes over {max_step:g} s")
            continue
        progress(f"[steptime] {workload}: {name} warm-up step {seconds:.2f} s")
    times = {name: ([], []) for name in optimizers}  # (regular, refresh) in ms
    order = list(optimizers)
    for r in range(repeats):
        t0 = time.perf_counter()
        for name in order[r % len(order):] + order[:r % len(order)]:
            # 0-based steps r*M+1 .. (r+1)*M: M-1 regular ones, the last one a refresh
            for k in range(r * measure_interval + 1, (r + 1) * measure_interval + 1):
                refresh = split_variant(name)[0] in RANKED and k % measure_interval == 0
                times[name][refresh].append(timed_step(optimizers[name]) * 1e3)
        progress(f"[steptime] {workload}: round {r + 1}/{repeats} "
                 f"({time.perf_counter() - t0:.1f} s)")
    n_params = sum(p.numel() for p in module.parameters())
    rows = []
    for name, (regular, refreshes) in times.items():
        regular_ms = statistics.median(regular)
        refresh_ms = statistics.median(refreshes) if refreshes else None
        amortized = regular_ms if refresh_ms is None else \
            (refresh_ms + (interval - 1) * regular_ms) / interval
        rows.append(dict(workload=workload, optimizer=name, library=library(name),
                         rank=rank if split_variant(name)[0] in RANKED else None, params=n_params,
                         regular_ms=regular_ms, refresh_ms=refresh_ms, amortized_ms=amortized))
    reference = next(row["amortized_ms"] for row in rows if row["optimizer"] == REFERENCE)
    for row in rows:
        row["ratio_to_fused_adamw"] = row["amortized_ms"] / reference
    rows.sort(key=lambda row: row["ratio_to_fused_adamw"])
    return rows, skipped


def _ms(value) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def markdown(rows, skipped, settings) -> str:
    threads = settings["torch_threads"]
    parts = [f"`optimizer.step()` time in ms (median of {settings['repeats']} interleaved rounds "
             f"of {settings['measure_interval']} steps), the refresh amortized over "
             f"U = {settings['interval']} steps; ratio = amortized / fused torch AdamW in the same "
             f"process (lower is faster). Device {settings['device']}, {threads} torch "
             f"thread{'s' if threads > 1 else ''}, fp32."]
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
        if skipped.get(workload):
            parts.append("Not timed: " + "; ".join(f"{name} ({why})"
                                                   for name, why in skipped[workload].items()))
    return "\n\n".join(parts) + "\n"


def figure(rows, skipped):
    plt = report.pyplot()
    if plt is None or not rows:
        return None
    workloads = list(dict.fromkeys(row["workload"] for row in rows))
    height = max(sum(row["workload"] == w for row in rows) for w in workloads)
    fig, axes = plt.subplots(1, len(workloads), squeeze=False,
                             figsize=(5.5 * len(workloads), 0.32 * height + 1.5))
    for ax, workload in zip(axes[0], workloads):
        mine = [row for row in rows if row["workload"] == workload][::-1]  # fastest on top
        ratios = [row["ratio_to_fused_adamw"] for row in mine]
        ax.barh([row["optimizer"] for row in mine], ratios,
                color=["tab:orange" if row["library"] == "slimopt" else "tab:blue"
                       for row in mine])
        ax.axvline(1.0, color="black", linewidth=1)
        log = max(ratios) / min(ratios) > 20
        if log:
            ax.set_xscale("log")
        ax.set_xlim(right=max(ratios) * (2 if log else 1.15))
        for y, ratio in enumerate(ratios):
            ax.text(ratio, y, f" {ratio:.2f}", va="center", fontsize=7)
        ax.set_title(workload)
        gone = skipped.get(workload)
        ax.set_xlabel("amortized step time / fused AdamW"
                      + (f"\nnot timed: {', '.join(gone)}" if gone else ""))
        ax.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in ("tab:orange", "tab:blue")],
                  ["slimopt", "peers"], loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def run(args, folder, info) -> list[str]:
    cuda = torch.device(args.device).type == "cuda"
    workloads = args.steptime_workloads or DEFAULT_WORKLOADS[
        "quick" if args.quick else "cuda" if cuda else "cpu"]
    names = args.steptime_optimizers or DEFAULT_OPTIMIZERS
    max_step = args.steptime_max_step if args.steptime_max_step is not None \
        else 5.0 if args.quick else 30.0
    settings = dict(device=args.device, repeats=args.steptime_repeats or (2 if args.quick else 3),
                    interval=args.steptime_interval,
                    measure_interval=args.steptime_measure_interval, max_step_s=max_step or None,
                    lr=1e-3, gradient_scale=1e-3, dtype="float32", reference=REFERENCE)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(args.steptime_threads or 1)
    settings["torch_threads"] = torch.get_num_threads()
    rows, skipped = [], {}
    try:
        for workload in workloads:
            rank = args.steptime_rank or PAPER_RANK[workload.split("-", 1)[1]]
            t0 = time.perf_counter()
            module = build_workload(workload, args.device)
            print(f"[steptime] {workload}: {sum(p.numel() for p in module.parameters()) / 1e6:.1f}M"
                  f" parameters, rank {rank}, {len(names)} optimizers", file=sys.stderr)
            mine, skipped[workload] = measure(
                module, names, rank=rank, interval=settings["interval"],
                measure_interval=settings["measure_interval"], repeats=settings["repeats"],
                device=args.device, max_step=max_step, workload=workload,
                progress=lambda line: print(line, file=sys.stderr))
            rows += mine
            del module
            print(f"[steptime] {workload}: done in {time.perf_counter() - t0:.0f} s; ratios "
                  + ", ".join(f"{r['optimizer']} {r['ratio_to_fused_adamw']:.2f}" for r in mine),
                  file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    data = dict(settings=settings, rows=rows, skipped=skipped)
    info = dict(info, machine=dict(info["machine"], torch_threads=settings["torch_threads"]))
    return report.write(folder, "steptime", info, data, markdown(rows, skipped, settings),
                        figure(rows, skipped))
