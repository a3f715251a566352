"""GPU suite: one command, about 8 minutes on one H100/H200, everything a GPU session should
measure and commit.

    python -m benchmarks gpu                      # CUDA: writes benchmarks/results/<gpu>/gpu.*
    python -m benchmarks gpu --dry-run --out DIR  # CPU, toy sizes, under a minute (CI)

Parts, each with its own time cap (a share of ``--gpu-budget``, 420 s by default); what a cap cut
short is listed under ``skipped`` in the results:

1. ``kernels``: every Triton kernel against torch (``benchmarks.kernels.check``: float64 torch
   from the same inputs) in float32 and bfloat16 on awkward sizes (1031 x 129 x 3001 on CUDA), plus
   Newton-Schulz on awkward shapes (a single row, tall, transposed, strided) against slimopt's own
   torch path in the same dtype; max relative error per kernel and dtype, pass/fail.
2. ``newton_schulz``: 5 Muon steps in bfloat16, slimopt's Triton and torch paths and torch's own
   NS5 (``torch.optim._muon._zeropower_via_newtonschulz``, or the same iteration written out),
   against a bfloat16 ``torch.matmul`` ceiling ((m x m) @ (m x n)) timed in the same run; CUDA
   events after warm-up, medians. Goal lines: Triton >= 1.3x torch NS5, executed TFLOP/s >= 60%
   of the ceiling (the Triton kernels execute about 3 m^2 n + m^3 multiply-adds a step, the dense
   count is 4 m^2 n + 2 m^3; both TFLOP/s figures are reported).
3. ``steptime``: ``optimizer.step()`` on one LLaMA-1B decoder block (``benchmarks.steptime``'s
   ``measure``): every optimizer of the steptime suite vs fused torch AdamW, galore-torch included,
   plus GrassJump with its stored basis and GaLore with randomized SVD.
4. ``convergence``: a short LLaMA-60M pretraining (``benchmarks.convergence``'s runner, the offline
   default corpus) of GrassWalk, GaLore (slimopt), SNSM, AdamW and galore-torch, each at its
   learning-rate centre, equal tokens; each run's time is capped at the part's cap / runs.

``--dry-run`` (also ``--device cpu``) runs every part at toy sizes on the CPU (the Triton parts
under ``TRITON_INTERPRET=1`` when triton is importable) into ``OUT/cpu/gpu.{json,md}``. Without a
GPU and without ``--dry-run`` the suite refuses (exit code 2).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

from . import report

NAME = "gpu"
NS_STEPS = 5
GOAL_VS_TORCH_NS5 = 1.3
GOAL_OF_CEILING = 0.6
#: share of the budget each part may use (what one part leaves over goes to the next)
SHARES = {"kernels": 0.10, "newton_schulz": 0.15, "steptime": 0.25, "convergence": 0.50}
#: Newton-Schulz vs slimopt's torch path, same dtype, 5 Muon steps (tests see <= 1.5e-6 / 1.3e-3)
NS_VS_TORCH_RTOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2}
CONVERGENCE_METHODS = ("grasswalk", "galore-slimopt", "snsm", "adamw", "galore")
STEPTIME_DRY = ("adamw-fused", "galore", "galore-slimopt", "grasswalk", "snsm")
#: the speed options, timed beside the defaults (``benchmarks.steptime`` variants)
STEPTIME_VARIANTS = ("grassjump:store_basis=True", "galore-slimopt:svd=randomized")

SIZES = {  # per mode
    "cuda": dict(ns_shapes=[(4096, 4096), (4096, 11008), (8192, 8192)], warmup=5, repeats=20,
                 ns_check=[("contiguous", 1031, 3001), ("transposed", 3001, 1031),
                           ("strided", 2053, 517), ("contiguous", 1, 4097)],
                 block="block-1b", rank=512, steptime_repeats=3,
                 convergence=dict(preset="60m", steps=300, batch_size=32, seq_len=256, warmup=30,
                                  update_interval=100, eval_every=50, eval_batches=8,
                                  max_chars=10_000_000)),
    "dry": dict(ns_shapes=[(48, 80)], warmup=1, repeats=2,
                ns_check=[("contiguous", 33, 70), ("transposed", 70, 33), ("strided", 40, 17),
                          ("contiguous", 1, 17)],
                block="block-60m", rank=16, steptime_repeats=1,
                convergence=dict(preset="tiny", steps=4, batch_size=4, seq_len=32, warmup=1,
                                 update_interval=2, eval_every=2, eval_batches=1,
                                 max_chars=200_000)),
}


def say(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


def add_arguments(group) -> None:
    group.add_argument("--dry-run", action="store_true",
                       help="gpu suite: every part at toy sizes on the CPU (what CI runs)")
    group.add_argument("--gpu-budget", type=float, default=420.0, metavar="SECONDS",
                       help="gpu suite: time for the four parts together (default 420; the "
                            "parts get 10/15/25/50%%, what one leaves goes to the next)")


def refuse_without_gpu(args) -> str | None:
    """The one-line error when the gpu suite would need a GPU that torch does not see."""
    if args.dry_run or args.device == "cpu" or torch.cuda.is_available():
        return None
    return ("python -m benchmarks gpu: needs a CUDA GPU and torch sees none; "
            "use --dry-run for the CPU toy-size run")


# ---------------------------------------------------------------------------- helpers
class Budget:
    """Seconds left overall and for the part under way."""

    def __init__(self, total: float):
        self.end = time.perf_counter() + total
        self.part_end = self.end
        self.skipped: list[str] = []

    def start(self, part: str, share: float, parts_left: float) -> float:
        left = max(0.0, self.end - time.perf_counter())
        cap = left * share / parts_left
        self.part_end = time.perf_counter() + cap
        say(f"{part}: time cap {cap:.0f} s")
        return cap

    def left(self) -> float:
        return self.part_end - time.perf_counter()

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        say(f"skipped: {what}")


def timer(device: torch.device):
    """``time(fn, warmup, repeats)``: median milliseconds; CUDA events on a GPU."""
    if device.type == "cuda":
        from .kernels import cuda_time
        return cuda_time

    def cpu_time(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu_time


def torch_ns5():
    """torch's Muon Newton-Schulz (``(grad) -> bfloat16 matrix``), or the same iteration written
    out when this torch has no ``torch.optim._muon``; and which one it is."""
    from slimopt.kernels import MUON_COEFFICIENTS
    try:
        from torch.optim._muon import _zeropower_via_newtonschulz as zp
        return (lambda g: zp(g, MUON_COEFFICIENTS, NS_STEPS, 1e-7)), "torch.optim._muon"
    except ImportError:
        pass

    def ns5(g):
        a, b, c = MUON_COEFFICIENTS
        x = g.bfloat16()
        tall = g.shape[0] > g.shape[1]
        x = x.T if tall else x
        x = x / x.norm().clamp(min=1e-7)
        for _ in range(NS_STEPS):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        return x.T if tall else x
    return ns5, "written-out NS5"


def triton_status(dry: bool) -> str | None:
    """Why the Triton kernels cannot run here, or None."""
    from slimopt.kernels.dispatch import interpreting, triton_available
    if not triton_available():
        return "triton is not installed"
    if dry and not interpreting():
        return "a Triton module was imported before TRITON_INTERPRET=1 was set"
    return None


# ---------------------------------------------------------------------------- parts
def _awkward(kind: str, rows: int, cols: int, dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows * 7919 + cols)
    if kind == "transposed":
        x = torch.randn(cols, rows, generator=gen).T
    elif kind == "strided":
        x = torch.randn(rows, 2 * cols, generator=gen)[:, ::2]
    else:
        x = torch.randn(rows, cols, generator=gen)
    return x.to(device=device, dtype=dtype)


def part_kernels(device, sizes, dry, budget) -> dict:
    why = triton_status(dry)
    if why:
        budget.skip(f"kernels: {why}")
        return dict(status="skipped", reason=why, rows=[], max_error={})
    from slimopt.kernels import MUON_COEFFICIENTS, newton_schulz_torch
    from slimopt.kernels import triton_newton_schulz as tns

    from .kernels import check, relative_error
    rows = [dict(r, shape="small" if dry else "1031x129x3001", vs="float64")
            for r in check(device, small=dry, progress=say)]
    steps = [MUON_COEFFICIENTS] * NS_STEPS
    for dtype in (torch.float32, torch.bfloat16):
        for kind, m, n in sizes["ns_check"]:
            if budget.left() <= 0:
                budget.skip(f"kernels: newton_schulz {kind} {m}x{n} {dtype} (time cap)")
                continue
            x = _awkward(kind, m, n, dtype, device)
            err = relative_error(tns.newton_schulz(x, steps, dtype=dtype),
                                 newton_schulz_torch(x, steps, dtype=dtype))
            bound = NS_VS_TORCH_RTOL[dtype]
            rows.append(dict(kernel=f"newton_schulz ({NS_STEPS} steps)", vs="torch path",
                             dtype=str(dtype).replace("torch.", ""), shape=f"{kind} {m}x{n}",
                             error=err, bound=bound, ok=err < bound))
            say(f"[check] newton_schulz {kind} {m}x{n} {rows[-1]['dtype']} vs torch path: "
                f"{err:.2e} (bound {bound:.0e}) {'ok' if err < bound else 'FAIL'}")
    worst = {}
    for r in rows:
        key = f"{r['kernel']} / {r['dtype']}"
        worst[key] = max(worst.get(key, 0.0), r["error"])
    return dict(status="ok" if all(r["ok"] for r in rows) else "FAIL", rows=rows,
                max_error=worst)


def part_newton_schulz(device, sizes, dry, budget) -> dict:
    from slimopt.kernels import MUON_COEFFICIENTS, newton_schulz_torch

    from .kernels import ns_flops
    time_ms = timer(device)
    ns5, ns5_source = torch_ns5()
    why = triton_status(dry)
    if why:
        budget.skip(f"newton_schulz triton: {why}")
    coefficients = [MUON_COEFFICIENTS] * NS_STEPS
    dtype = torch.bfloat16
    rows = []
    for m0, n0 in sizes["ns_shapes"]:
        if budget.left() <= 0:
            budget.skip(f"newton_schulz {m0}x{n0} (time cap)")
            continue
        grad = torch.randn(m0, n0, device=device, dtype=dtype)
        m, n = min(m0, n0), max(m0, n0)
        a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, n, device=device,
                                                                          dtype=dtype)
        ceiling_ms = time_ms(lambda: torch.matmul(a, b), sizes["warmup"], sizes["repeats"])
        ceiling = 2 * m * m * n / ceiling_ms / 1e9
        block = 128
        if not why:
            from slimopt.kernels.triton_projection import launch_config
            block = launch_config("matmul", dtype)["BLOCK_M"]
        dense, executed = ns_flops(m, n, NS_STEPS, block)
        impls = {"torch NS5": (lambda: ns5(grad), dense),
                 "slimopt torch": (lambda: newton_schulz_torch(grad, coefficients, dtype=dtype),
                                   dense)}
        if not why:
            from slimopt.kernels import triton_newton_schulz as tns
            impls["slimopt triton"] = (lambda: tns.newton_schulz(grad, coefficients, dtype=dtype),
                                       executed)
        row = dict(shape=f"{m0}x{n0}", dtype="bfloat16", steps=NS_STEPS, ceiling_ms=ceiling_ms,
                   ceiling_tflops=ceiling, impls={})
        for impl, (fn, flops) in impls.items():
            ms = time_ms(fn, sizes["warmup"], sizes["repeats"])
            row["impls"][impl] = dict(ms=ms, tflops_dense=dense / ms / 1e9,
                                      tflops_executed=flops / ms / 1e9,
                                      of_ceiling=flops / ms / 1e9 / ceiling)
            say(f"[time] newton_schulz {m0}x{n0} {impl}: {ms:.3f} ms "
                f"({flops / ms / 1e9:.1f} TFLOP/s executed, ceiling {ceiling:.1f})")
        best = row["impls"].get("slimopt triton") or row["impls"]["slimopt torch"]
        row["speedup_vs_torch_ns5"] = row["impls"]["torch NS5"]["ms"] / best["ms"]
        row["of_ceiling"] = best["of_ceiling"]
        row["meets_goals"] = (row["speedup_vs_torch_ns5"] >= GOAL_VS_TORCH_NS5
                              and row["of_ceiling"] >= GOAL_OF_CEILING)
        rows.append(row)
    return dict(status="ok", torch_ns5=ns5_source, timer="cuda events" if device.type == "cuda"
                else "perf_counter", goals=dict(vs_torch_ns5=GOAL_VS_TORCH_NS5,
                                                of_ceiling=GOAL_OF_CEILING), rows=rows)


def part_steptime(device, sizes, dry, budget) -> dict:
    from . import steptime
    names = list(STEPTIME_DRY) if dry else list(steptime.DEFAULT_OPTIMIZERS)
    names += list(STEPTIME_VARIANTS)
    workload, rank = sizes["block"], sizes["rank"]
    module = steptime.build_workload(workload, str(device))
    cap = max(1.0, budget.left())
    rows, skipped = steptime.measure(
        module, names, rank=rank, repeats=sizes["steptime_repeats"], device=str(device),
        max_step=min(30.0, cap / 4), workload=workload, progress=say)
    for name, why in skipped.items():
        budget.skip(f"steptime {name}: {why}")
    del module
    return dict(status="ok", workload=workload, rank=rank, rows=rows, skipped=skipped,
                params=rows[0]["params"] if rows else 0)


def part_convergence(device, sizes, dry, budget, cache_dir) -> dict:
    from . import convergence as cv
    settings = sizes["convergence"]
    flags = []
    for key, value in settings.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    threads = 1 if dry else max(1, (os.cpu_count() or 1) // 2)
    flags += ["--threads", str(threads), "--cache-dir", cache_dir, "--no-progress",
              "--no-tensorboard"]
    methods = list(CONVERGENCE_METHODS)
    lrs = {m: [cv.LR_CENTRE.get(m, 3e-3)] for m in methods}
    data = cv.prepare_data(cv.pretrain_settings(flags))
    per_run = max(10.0, budget.left() / len(methods))
    say(f"convergence: {len(methods)} runs, {settings['steps']} steps x {settings['batch_size']} x "
        f"{settings['seq_len']} tokens each, at most {per_run:.0f} s a run")
    work_dir = tempfile.mkdtemp(prefix="slimopt-gpu-convergence-")
    try:
        runs = cv.sweep(methods, lrs, flags, work_dir, jobs=1 if not dry else 2,
                        env=cv._env("cpu" if dry else str(device), threads), timeout=per_run)
    finally:
        import shutil
        shutil.rmtree(work_dir, ignore_errors=True)
    for r in runs:
        r["log"] = None
        if r["status"] != "ok":
            budget.skip(f"convergence {r['method']}: {r['error']}")
    return dict(status="ok" if all(r["status"] == "ok" for r in runs) else "partial",
                settings=dict(settings, tokens_per_run=settings["steps"] * settings["batch_size"]
                              * settings["seq_len"], per_run_cap_s=per_run, **data),
                runs=[{k: v for k, v in r.items() if k != "log_tail" or r["status"] != "ok"}
                      for r in runs])


# ---------------------------------------------------------------------------- report
def _fmt(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def markdown(data: dict) -> str:
    out = [f"GPU suite ({data['mode']}, device {data['device']}, {data['wall_s']:.0f} s of a "
           f"{data['budget_s']:.0f} s budget)."]
    k = data["parts"].get("kernels", {})
    out.append(f"### 1. Triton kernels vs torch: {k.get('status', 'not run')}")
    if k.get("rows"):
        out.append("\n".join(["| kernel | dtype | vs | shape | relative error | bound | |",
                              "|---|---|---|---|---:|---:|---|"] + [
            f"| {r['kernel']} | {r['dtype']} | {r['vs']} | {r['shape']} | {r['error']:.2e} "
            f"| {r['bound']:.1e} | {'ok' if r['ok'] else 'FAIL'} |" for r in k["rows"]]))
    ns = data["parts"].get("newton_schulz", {})
    out.append(f"### 2. Newton-Schulz ({NS_STEPS} Muon steps, bfloat16) vs "
               f"{ns.get('torch_ns5', 'torch NS5')} and a bf16 matmul ceiling")
    lines = ["| shape | impl | ms | TFLOP/s dense | TFLOP/s executed | of ceiling | ceiling "
             "TFLOP/s |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in ns.get("rows", []):
        for impl, t in r["impls"].items():
            lines.append(f"| {r['shape']} | {impl} | {t['ms']:.3f} | {t['tflops_dense']:.3g} "
                         f"| {t['tflops_executed']:.3g} | {t['of_ceiling']:.0%} "
                         f"| {r['ceiling_tflops']:.3g} |")
    out.append("\n".join(lines))
    if data["device"] == "cpu":
        out.append("Dry run: CPU timings, Triton under its interpreter; the goals below mean "
                   "nothing here.")
    out.append("\n".join(
        f"- {r['shape']}: {r['speedup_vs_torch_ns5']:.2f}x torch NS5 (goal >= "
        f"{GOAL_VS_TORCH_NS5}x), {r['of_ceiling']:.0%} of the ceiling (goal >= "
        f"{GOAL_OF_CEILING:.0%}): {'meets' if r['meets_goals'] else 'misses'} the goals"
        for r in ns.get("rows", [])) or "(not run)")
    st = data["parts"].get("steptime", {})
    out.append(f"### 3. optimizer.step() on {st.get('workload', '-')} "
               f"({st.get('params', 0) / 1e6:.1f}M parameters, rank {st.get('rank', '-')})")
    out.append("\n".join(["| optimizer | library | regular ms | refresh ms | amortized ms "
                          "| x fused AdamW |", "|---|---|---:|---:|---:|---:|"] + [
        f"| {r['optimizer']} | {r['library']} | {_fmt(r['regular_ms'])} | "
        f"{_fmt(r['refresh_ms'])} | {_fmt(r['amortized_ms'])} | {r['ratio_to_fused_adamw']:.2f} |"
        for r in st.get("rows", [])]))
    cv = data["parts"].get("convergence", {})
    s = cv.get("settings", {})
    out.append(f"### 4. Pretraining, preset {s.get('preset', '-')}, {s.get('steps', '-')} steps, "
               f"{s.get('tokens_per_run', 0):,} tokens per run")
    out.append("\n".join(["| method | library | lr | eval loss | eval ppl | train s | status |",
                          "|---|---|---:|---:|---:|---:|---|"] + [
        f"| {r['method']} | {r['library']} | {r['lr']:g} | {_fmt(r['eval_loss'], '.4f')} "
        f"| {_fmt(r['eval_perplexity'], '.1f')} | {_fmt(r['seconds'], '.0f')} "
        f"| {r['status']}{': ' + str(r['error']) if r['error'] else ''} |"
        for r in cv.get("runs", [])]))
    out.append("Skipped: " + ("; ".join(data["skipped"]) or "nothing"))
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------- entry point
def run(args, folder, info) -> list[str]:
    dry = args.dry_run or args.device == "cpu"
    if dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    device = torch.device("cpu" if dry else args.device)
    sizes = SIZES["dry" if dry else "cuda"]
    budget = Budget(args.gpu_budget)
    t0 = time.perf_counter()
    parts = {}
    runners = {"kernels": part_kernels, "newton_schulz": part_newton_schulz,
               "steptime": part_steptime,
               "convergence": lambda *a: part_convergence(*a, args.convergence_cache_dir)}
    for i, (part, fn) in enumerate(runners.items()):
        later = sum(list(SHARES.values())[i:])
        budget.start(part, SHARES[part], later)
        start = time.perf_counter()
        try:
            parts[part] = fn(device, sizes, dry, budget)
        except Exception as err:  # one broken part must not lose the others' results
            parts[part] = dict(status="error", error=f"{type(err).__name__}: {err}")
            budget.skip(f"{part}: raised {type(err).__name__}: {err}")
        parts[part]["wall_s"] = time.perf_counter() - start
        say(f"{part}: {parts[part]['status']} in {parts[part]['wall_s']:.0f} s")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = dict(info, machine=dict(info["machine"], triton=triton_version))
    data = dict(mode="dry-run (CPU, toy sizes)" if dry else "cuda", device=str(device),
                gpu=None if dry else torch.cuda.get_device_name(device),
                triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
                budget_s=args.gpu_budget, wall_s=time.perf_counter() - t0, shares=SHARES,
                sizes={k: v for k, v in sizes.items()}, parts=parts, skipped=budget.skipped)
    from .convergence import _clean
    data = _clean(data)
    return report.write(folder, NAME, info, data, markdown(data))


def dry_folder(base: str | None) -> str:
    """Where a dry run writes without ``--out``: a temporary folder, not the committed results."""
    return base or os.path.join(tempfile.gettempdir(), "slimopt-gpu-dry-run")

