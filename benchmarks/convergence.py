"""Convergence suite: training loss and eval perplexity vs tokens for every slimopt optimizer and
every peer, each at a small learning-rate sweep, trained by ``slimopt-pretrain``.

What runs: for every method and every learning rate of its grid, one ``slimopt-pretrain`` run
(``--optimizer METHOD --lr LR`` and the settings below; LLaMA model of the preset, cosine schedule
with linear warmup to 10% of the peak, gradient clipping at 1.0, weight decay 0, the GaLore
parameter split), all runs on the same data in the same order from the same initial weights (seed
0). Its ``result.json`` gives the final eval loss, the optimizer-state bytes and the loss curve
(``curve``: step, tokens, mean train loss since the previous point, eval loss at every
``--eval-every`` step and the last).

- Methods: those whose record (``slimopt.launch.records``) names the convergence suite: the
  slimopt optimizers and the peers except ``adamw-fused`` (the same math as ``adamw``).
- Learning rates: a half-decade ladder (1, 3, 10, 30, ...) around a per-method centre, 3 points by
  default (``--convergence-grid``). Centre 3e-3 (grid 1e-3, 3e-3, 1e-2) for the Adam-like methods,
  Muon and ROOT (RMS-matched to AdamW), GaLore-torch (which applies its scale 0.25 itself),
  APOLLO, APOLLO-Mini, Fira and Adafactor (external lr, no relative step); centre 3e-2 (grid 1e-2,
  3e-2, 1e-1) for SNSM, SubspaceMomentum and SubsetNorm, whose paper uses ~10x Adam's lr.
- Selection: a method's best lr is the one with the lowest final eval loss. The eval split (the
  last 2% of the corpus's documents, held out from training) is also the split reported: there
  is no separate test split on these short runs, so the best-of-3 numbers are slightly
  optimistic, alike for every method. A best lr at the lowest or highest lr of the sweep is
  marked in the table (the optimum may lie beyond it).
- Settings: CPU (``--device cpu``, default): the ``tiny`` preset's defaults (1.3M parameters, 200
  steps of 16 x 128 tokens = 409,600 tokens, rank 32, update interval 50, warmup 20) on the default
  corpus (the Python standard library's source, byte-level BPE of 2048), evaluated every 25 steps
  (8 batches of 16 x 128 held-out tokens). GPU (``--device cuda``): the ``60m`` preset (rank 128)
  for 500 steps of 64 x 256 tokens (8.2M tokens, about two passes over the stdlib corpus at a
  32k vocabulary: pass ``--convergence-pretrain-args "--data CORPUS"`` for a real one), warmup
  50, update interval 100, eval every 50 steps. ``--convergence-preset`` picks another preset;
  ``--convergence-steps``, ``--convergence-eval-every`` and ``--convergence-pretrain-args`` (any
  ``slimopt-pretrain`` flags, appended last so they win) override the settings.
- ``--quick``: one lr per method (the centre) and tiny runs: 8 steps of 8 x 64 tokens, eval
  every 4 steps on 2 batches, update interval 4, the first 400k characters of the corpus.
- Processes: the runs go to ``--convergence-jobs N`` worker subprocesses, N at once, each run
  with ``--threads cores/N`` (``--convergence-threads``). A worker imports torch, transformers and
  ``slimopt.launch.pretrain`` once, then runs the command lines it is given one after the other
  through ``slimopt.launch.pretrain.execute(argv)``, the console script's own code: a fresh
  ``python -m slimopt.launch.pretrain`` per run spent 10-20 s of its 15-45 s starting Python and
  importing on 2 busy cores. Each run seeds itself, so its numbers do not depend on what ran
  before it in the same worker (checked: the same eval loss as a fresh CLI run). On CPU the
  default is one job per core with one thread each: on 2 cores shared with other work, 4 tiny runs
  of 40 steps took 92 s as 2 jobs x 1 thread and 716 s as 1 job x 2 threads (the two threads of
  one run wait on each other whenever a core is busy). On GPU the default is 1 job. The full CPU
  sweep (45 runs) took 70 minutes on 2 shared cores; Muon and ROOT take ~3x longer per run than
  the others there (their Newton-Schulz iteration runs in bfloat16, slow on this CPU).
- Robustness: each run's stdout/stderr goes to ``train.log`` in its own folder under a temporary
  work dir (``--convergence-work-dir`` to keep it); a run that exits non-zero, raises, takes its
  worker down, times out (``--convergence-timeout``; its worker is killed and replaced) or
  reports a non-finite loss is recorded as failed with the last lines of its log, and the suite
  carries on. Checkpoints are deleted after each run. A method name the registry does not know or
  a learning rate that is not a finite positive number is refused before anything runs.

Writes ``convergence.json`` (settings, every run with its curve, the best run per method),
``convergence.md`` (the table) and ``convergence.png`` (left: eval loss vs tokens of each method's
best run, slimopt solid, peers dashed; right: final eval loss vs lr, the sweep).

    python -m benchmarks convergence                        # CPU, tiny preset, 3 lrs per method
    python -m benchmarks convergence --quick --out /tmp/cv  # smoke test
    python -m benchmarks convergence --convergence-methods grasswalk adamw --convergence-lrs 3e-3
    python -m benchmarks convergence --device cuda          # 60m preset
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from slimopt.launch import records
from slimopt.launch.registry import KNOWN

from . import report

REPO = report.ROOT
_RUN = records.in_suite(records.CONVERGENCE)
SLIMOPT_METHODS = tuple(m.name for m in _RUN if not m.is_peer)
#: the peers in a fixed order; adamw-fused is left out (the same update as adamw)
PEER_METHODS = tuple(m.name for m in _RUN if m.is_peer)
METHODS = SLIMOPT_METHODS + PEER_METHODS
LIBRARY = {m.name: m.library for m in _RUN}
#: the centre of each method's lr grid (see the module docstring)
LR_CENTRE = {m.name: m.lr_centre for m in _RUN}

#: per preset: the suite's changes to the preset's training defaults
PRESET_SETTINGS = {
    "tiny": dict(eval_every=25),
    "60m": dict(steps=500, batch_size=64, seq_len=256, warmup=50, update_interval=100,
                eval_every=50),
}
QUICK_SETTINGS = dict(steps=8, batch_size=8, seq_len=64, eval_every=4, eval_batches=2, warmup=2,
                      update_interval=4, max_chars=400_000)
#: started first so that they do not finish alone at the end: Newton-Schulz in bfloat16 (Muon,
#: ROOT) is ~10x slower than float32 matmuls on a CPU without bfloat16 units
SLOW_ON_CPU = ("muon", "root")
LOG_TAIL = 20
#: environment variables of torchrun/DDP that must not leak into a single-process run
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def say(message: str) -> None:
    print(f"[convergence] {message}", file=sys.stderr, flush=True)


def add_arguments(group) -> None:
    group.add_argument("--convergence-methods", nargs="+", metavar="NAME",
                       help=f"methods to train (default: all): {', '.join(METHODS)}")
    group.add_argument("--convergence-lrs", nargs="+", type=float, metavar="LR",
                       help="the same learning rates for every method (default: each method's "
                            "grid around its centre)")
    group.add_argument("--convergence-grid", type=int, metavar="N",
                       help="learning rates per method on the 1-3-10 ladder around its centre "
                            "(default 3; 1 with --quick)")
    group.add_argument("--convergence-preset",
                       help="model preset (default: tiny on CPU, 60m on GPU, tiny with --quick)")
    group.add_argument("--convergence-steps", type=int, help="training steps per run")
    group.add_argument("--convergence-eval-every", type=int, help="steps between curve points")
    group.add_argument("--convergence-pretrain-args", default="", metavar="FLAGS",
                       help="extra slimopt-pretrain flags for every run, one string "
                            "(e.g. \"--data corpus.jsonl --max-chars 1000000\")")
    group.add_argument("--convergence-jobs", type=int,
                       help="trainings at once (default: one per CPU core on CPU, 1 on GPU)")
    group.add_argument("--convergence-threads", type=int,
                       help="torch threads per training (default: cores / jobs)")
    group.add_argument("--convergence-cache-dir",
                       default=os.path.join(os.path.expanduser("~"), ".cache", "slimopt"),
                       help="tokenizer and token cache shared by all runs (default: "
                            "slimopt-pretrain's, ~/.cache/slimopt)")
    group.add_argument("--convergence-work-dir",
                       help="per-run folders (logs, result.json) are kept here (default: a "
                            "temporary folder, removed at the end)")
    group.add_argument("--convergence-timeout", type=float, default=None, metavar="SECONDS",
                       help="a run taking longer is stopped and recorded as failed "
                            "(default: no limit)")


# ---------------------------------------------------------------------------- settings
def lr_grid(centre: float, points: int) -> list[float]:
    """``points`` learning rates of the half-decade ladder ..., 1e-3, 3e-3, 1e-2, 3e-2, ...
    centred on ``centre`` (which is rounded onto the ladder)."""
    k = round(2 * math.log10(centre))
    lo = k - (points - 1) // 2
    return [float(f"{1 if j % 2 == 0 else 3}e{j // 2}") for j in range(lo, lo + points)]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_methods_and_lrs(methods, lrs_by_method) -> None:
    """ValueError for a method the registry does not know (listing the known ones) or a learning
    rate that is not a finite positive number: raised before anything runs."""
    unknown = [m for m in methods if m not in KNOWN]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(METHODS)} (and adamw-fused)")
    for method in methods:
        lrs = lrs_by_method[method]
        if not lrs:
            raise ValueError(f"no learning rate for {method}")
        for lr in lrs:
            if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
                raise ValueError(f"learning rate {lr!r} for {method} is not a finite number > 0")


def resolve(args) -> dict:
    """The suite's plan from the command line: methods, lrs, pretrain flags, jobs, threads."""
    device = args.device
    on_gpu = device.startswith("cuda")
    quick = bool(getattr(args, "quick", False))
    preset = args.convergence_preset or ("60m" if on_gpu and not quick else "tiny")
    from slimopt.launch.presets import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    methods = [m.lower() for m in (args.convergence_methods or METHODS)]
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is named twice in {methods}")
    points = args.convergence_grid or (1 if quick else 3)
    if points < 1:
        raise ValueError(f"--convergence-grid must be >= 1, got {points}")
    if args.convergence_lrs:
        lrs = {m: list(args.convergence_lrs) for m in methods}
    else:
        lrs = {m: lr_grid(LR_CENTRE.get(m, 3e-3), points) for m in methods}
    check_methods_and_lrs(methods, lrs)
    overrides = dict(QUICK_SETTINGS if quick else PRESET_SETTINGS.get(preset, {}))
    if args.convergence_steps is not None:
        overrides["steps"] = args.convergence_steps
    if args.convergence_eval_every is not None:
        overrides["eval_every"] = args.convergence_eval_every
    jobs = args.convergence_jobs or (1 if on_gpu else _cores())
    threads = args.convergence_threads or max(1, _cores() // jobs)
    if jobs < 1 or threads < 1:
        raise ValueError("--convergence-jobs and --convergence-threads must be >= 1")
    flags = ["--preset", preset]
    for key, value in overrides.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    flags += ["--threads", str(threads), "--cache-dir", args.convergence_cache_dir,
              "--no-progress", "--no-tensorboard"]
    flags += shlex.split(args.convergence_pretrain_args or "")
    return dict(device=device, preset=preset, quick=quick, methods=methods, lrs=lrs,
                flags=flags, jobs=jobs, threads=threads, timeout=args.convergence_timeout,
                work_dir=args.convergence_work_dir)


def pretrain_settings(flags: list[str]):
    """slimopt-pretrain's parsed arguments for ``flags`` (every default filled in); its own
    checks apply (a bad flag is its one-line error and SystemExit 2)."""
    from slimopt.launch.pretrain import parse_args
    return parse_args(flags + ["--optimizer", "adamw", "--output-dir", os.devnull])


def prepare_data(settings) -> dict:
    """Train the tokenizer and pack the tokens once, into the shared cache, before the runs start
    (so parallel runs do not all do it); returns the corpus figures."""
    from slimopt.launch.data import load_documents, token_blocks, tokenizer_for
    docs, corpus_id = load_documents(settings.data, text_column=settings.text_column,
                                     max_chars=settings.max_chars)
    tokenizer = tokenizer_for(docs, corpus_id, settings.vocab_size, settings.cache_dir)
    train, held = token_blocks(docs, tokenizer, settings.seq_len, corpus_id, settings.cache_dir)
    return dict(corpus=corpus_id, documents=len(docs), train_tokens=train.numel(),
                eval_tokens=held.numel(), vocab=tokenizer.get_vocab_size())


# ---------------------------------------------------------------------------- runs
def _env(device: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # slimopt-pretrain takes the GPU whenever it sees one
    elif device.startswith("cuda:"):
        env["LOCAL_RANK"] = device.split(":", 1)[1]  # its device index without torchrun
    return env


def _tail(path: str, lines: int = LOG_TAIL) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_result(result: dict) -> str | None:
    """Why a finished run's result counts as failed (a non-finite loss anywhere), or None."""
    if not _finite(result.get("eval_loss")):
        return f"non-finite final eval loss {result.get('eval_loss')}"
    for point in result.get("curve") or []:
        for key in ("train_loss", "eval_loss"):
            value = point.get(key)
            if value is not None and not _finite(value):
                return f"non-finite {key} {value} at step {point.get('step')}"
    return None


class Worker:
    """A training subprocess that imports torch, transformers and ``slimopt.launch.pretrain`` once
    and then runs ``slimopt-pretrain`` command lines one after the other (``execute(argv)``, the
    console script's code), each with its stdout/stderr in its own log file. Starting Python
    and importing those costs 5-20 s on 2 busy CPU cores, more than a quick run's training."""

    def __init__(self, env: dict, cwd: str, log: str):
        self.log, self.timed_out = log, False
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from benchmarks.convergence import worker; worker()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=cwd,
                text=True, bufsize=1)
        self.ready = self._reply(None) is not None

    def _reply(self, timeout):
        """The worker's next JSON line, or None if it died (killed after ``timeout`` seconds:
        ``timed_out`` is then True)."""
        self.timed_out = False

        def kill():
            self.timed_out = True
            self.proc.kill()
        timer = threading.Timer(timeout, kill) if timeout else None
        if timer:
            timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            if timer:
                timer.cancel()
        if not line:
            self.proc.wait()
            return None
        return json.loads(line)

    def train(self, argv: list[str], log: str, timeout: float | None):
        """``(exit code, None)``, or ``(None, why)`` when the worker died or timed out (it is
        then dead: start a new one)."""
        if not self.ready or self.proc.poll() is not None:
            return None, f"the training worker could not start:\n{_tail(self.log)}"
        try:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": log}) + "\n")
            self.proc.stdin.flush()
        except OSError as err:
            return None, f"the training worker is gone ({err})"
        reply = self._reply(timeout)
        if reply is None:
            self.ready = False
            if self.timed_out:
                return None, f"timed out after {timeout:g} s"
            return None, f"the training process died (exit code {self.proc.returncode})"
        return reply["returncode"], None

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def worker() -> None:
    """The worker's loop: one JSON task per stdin line (``argv``, ``log``), one JSON reply per
    task on stdout (``returncode``: 0, 2 for a usage error, 1 for an exception, whose traceback
    goes to the log)."""
    import gc
    import traceback
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray output between tasks
    import transformers
    from slimopt.launch import pretrain
    transformers.LlamaForCausalLM  # noqa: B018 -- its (lazy, slow) import, done once here
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        task = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        fd = os.open(task["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        try:
            pretrain.execute(task["argv"])
            code = 0
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
            if not isinstance(err.code, (int, type(None))):
                print(err.code, file=sys.stderr)
        except Exception:  # noqa: BLE001 -- recorded as a failed run
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            gc.collect()
        replies.write(json.dumps({"returncode": code}) + "\n")


def train_one(method: str, lr: float, flags: list[str], folder: str, runner: Worker,
              timeout: float | None = None) -> dict:
    """One ``slimopt-pretrain --optimizer METHOD --lr LR --output-dir FOLDER FLAGS`` run in
    ``runner``; never raises for a failed run: the row says ``status`` "ok" or "failed" (with
    ``error`` and the log's last lines)."""
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "train.log")
    argv = [*flags, "--optimizer", method, "--lr", repr(lr), "--output-dir", folder]
    row = dict(method=method, library=LIBRARY.get(method, "?"), lr=lr, status="failed",
               error=None, eval_loss=None, eval_perplexity=None, state_bytes=None,
               adamw_state_bytes=None, params=None, tokens=None, seconds=None, curve=[],
               wall_s=None, log=log,
               command="slimopt-pretrain " + " ".join(shlex.quote(a) for a in argv))
    t0 = time.time()
    returncode, row["error"] = runner.train(argv, log, timeout)
    row["wall_s"] = time.time() - t0
    if returncode is not None and returncode != 0:
        row["error"] = f"exit code {returncode}"
    elif returncode == 0:
        try:
            with open(os.path.join(folder, "result.json")) as f:
                result = json.load(f)
        except (OSError, ValueError) as err:
            result, row["error"] = None, f"no readable result.json ({err})"
        if result is not None:
            for key in ("eval_loss", "eval_perplexity", "state_bytes", "adamw_state_bytes",
                        "params", "tokens", "seconds", "curve"):
                row[key] = result.get(key)
            row["curve"] = row["curve"] or []
            row["error"] = check_result(result)
            if not row["curve"] and row["error"] is None:
                row["error"] = "no loss curve in result.json"
            row["status"] = "ok" if row["error"] is None else "failed"
    if row["status"] != "ok":
        row["log_tail"] = _tail(log)
    for name in os.listdir(folder):  # the end-of-run checkpoint: not needed here, and large
        if name.startswith("checkpoint-") and name.endswith(".pt"):
            os.remove(os.path.join(folder, name))
    return row


def sweep(methods, lrs_by_method, flags, work_dir, *, jobs=1, env=None, timeout=None) -> list:
    """Train every (method, lr) on ``jobs`` worker processes; rows in (method, lr) order.
    Progress lines go to stderr."""
    import queue
    check_methods_and_lrs(methods, lrs_by_method)
    tasks = [(i, m, lr) for i, (m, lr) in
             enumerate((m, lr) for m in methods for lr in lrs_by_method[m])]
    tasks.sort(key=lambda t: t[1] not in SLOW_ON_CPU)  # stable: slow ones first, else in order
    env = env if env is not None else _env("cpu", 1)
    todo = queue.Queue()
    for task in tasks:
        todo.put(task)
    rows, lock = [None] * len(tasks), threading.Lock()

    def slot(number):
        current = None
        try:
            while True:
                try:
                    index, method, lr = todo.get_nowait()
                except queue.Empty:
                    return
                if current is None or not current.ready:
                    if current is not None:
                        current.close()
                    current = Worker(env, work_dir, os.path.join(work_dir, f"worker{number}.log"))
                folder = os.path.join(work_dir, f"{index:03d}-{method}-lr{lr:g}")
                row = train_one(method, lr, flags, folder, current, timeout)
                with lock:
                    rows[index] = row
                    head = f"{method} lr {lr:g} [{sum(r is not None for r in rows)}/{len(rows)}]"
                    if row["status"] == "ok":
                        say(f"{head}: eval loss {row['eval_loss']:.4f} (ppl "
                            f"{row['eval_perplexity']:.1f}), {row['seconds']:.0f} s of training, "
                            f"{row['wall_s']:.0f} s in all")
                    else:
                        last = (row.get("log_tail") or "").strip().splitlines()
                        say(f"{head}: FAILED ({row['error']})"
                            f"{': ' + last[-1] if last else ''}")
        finally:
            if current is not None:
                current.close()

    threads = [threading.Thread(target=slot, args=(n,), daemon=True)
               for n in range(max(1, min(jobs, len(tasks))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows


# ---------------------------------------------------------------------------- summary
def select_best(runs) -> dict:
    """Per method (in first-seen order): its best run = the lowest final eval loss among the runs
    that succeeded, with ``edge`` "low"/"high" when that lr is the lowest/highest lr the method was
    tried at (failed runs count as tried: a diverged higher lr brackets the optimum), None
    otherwise or when only one lr was tried."""
    best = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        tried = sorted({r["lr"] for r in mine})
        ok = [r for r in mine if r["status"] == "ok" and _finite(r.get("eval_loss"))]
        failed = [dict(lr=r["lr"], error=r.get("error")) for r in mine if r not in ok]
        if not ok:
            best[method] = dict(status="failed", library=mine[0].get("library"), lrs=tried,
                                failed=failed)
            continue
        top = min(ok, key=lambda r: r["eval_loss"])
        edge = None
        if len(tried) > 1:
            edge = "low" if top["lr"] == tried[0] else "high" if top["lr"] == tried[-1] else None
        best[method] = dict(status="ok", library=top.get("library"), best_lr=top["lr"],
                            edge=edge, lrs=tried, eval_loss=top["eval_loss"],
                            eval_perplexity=top.get("eval_perplexity"),
                            state_bytes=top.get("state_bytes"),
                            adamw_state_bytes=top.get("adamw_state_bytes"),
                            seconds=top.get("seconds"), tokens=top.get("tokens"),
                            eval_loss_by_lr={f"{r['lr']:g}": (r["eval_loss"] if r in ok else None)
                                             for r in mine},
                            failed=failed)
    return best


def lr_cell(summary: dict) -> str:
    cell = f"{summary['best_lr']:g}"
    if summary.get("edge") == "low":
        cell += " ↓edge"
    elif summary.get("edge") == "high":
        cell += " ↑edge"
    elif len(summary.get("lrs", ())) == 1:
        cell += " (no sweep)"
    return cell


def table(best: dict, settings: dict) -> str:
    base = best.get("adamw", {})
    base_loss = base.get("eval_loss") if base.get("status") == "ok" else None
    rows = sorted((s for s in best.items() if s[1]["status"] == "ok"),
                  key=lambda item: item[1]["eval_loss"])
    lines = ["| method | library | best lr | eval loss | eval ppl | loss / AdamW's | "
             "state bytes (% of AdamW) | train s |", "|---|---|---|---|---|---|---|---|"]
    for method, s in rows:
        ratio = f"{s['eval_loss'] / base_loss:.3f}" if base_loss else "-"
        share = (f"{s['state_bytes']:,} ({100 * s['state_bytes'] / s['adamw_state_bytes']:.0f}%)"
                 if s.get("state_bytes") is not None and s.get("adamw_state_bytes") else "-")
        seconds = f"{s['seconds']:.0f}" if _finite(s.get("seconds")) else "-"
        lines.append(f"| {method} | {s['library']} | {lr_cell(s)} | {s['eval_loss']:.4f} | "
                     f"{s['eval_perplexity']:.1f} | {ratio} | {share} | {seconds} |")
    for method, s in best.items():
        if s["status"] != "ok":
            lines.append(f"| {method} | {s['library']} | all failed | - | - | - | - | - |")
    failures = [f"{m} lr {f['lr']:g} ({f['error']})" for m, s in best.items()
                for f in s.get("failed", [])]
    st = settings
    notes = [
        "",
        f"Preset `{st['preset']}` ({st['params']:,} parameters) on {st['corpus']} "
        f"(vocab {st['vocab']:,}), {st['steps']} steps of {st['batch_size']} x {st['seq_len']} "
        f"tokens = {st['tokens_per_run']:,} tokens per run, warmup {st['warmup']}, cosine to "
        f"{st['min_lr_ratio']:g} x lr, rank {st['rank']}, update interval "
        f"{st['update_interval']}; eval loss = mean cross-entropy (nats/token) on "
        f"{st['eval_batches']} batch{'es' if st['eval_batches'] != 1 else ''} of held-out "
        f"tokens ({st['eval_every']} steps between curve points), at the last step; device "
        f"{st['device']}; {st['jobs']} runs at a time x {st['threads']} thread(s).",
        "Best lr = lowest final eval loss over the sweep; the eval split is also the split "
        "reported (no separate test split). ↓edge / ↑edge: the best lr is the lowest / highest "
        "lr tried, so the optimum may lie beyond the sweep. Loss / AdamW's: eval loss divided by "
        "AdamW's best, at equal tokens. State bytes: the optimizer's state against what torch "
        "AdamW holds for the same model. Train s: the training loop's wall time (evaluations "
        "included, start-up excluded).",
    ]
    if failures:
        notes.append("Failed runs: " + "; ".join(failures) + ".")
    return "\n".join(lines + notes)


def figure(runs: list, best: dict, settings: dict):
    plt = report.pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]  # dark, then light
    others = [m for m in best if m != "adamw"]
    colors = {m: palette[i % 20] for i, m in enumerate(others)}
    colors["adamw"] = "black"  # the reference
    finals = [r["eval_loss"] for r in runs if r["status"] == "ok"]
    for method, s in best.items():
        style = "-" if s.get("library") == "slimopt" else "--"
        if s["status"] == "ok":
            top = next(r for r in runs if r["method"] == method and r["lr"] == s["best_lr"])
            points = [p for p in top["curve"] if _finite(p.get("eval_loss"))]
            left.plot([p["tokens"] for p in points], [p["eval_loss"] for p in points], style,
                      color=colors[method], marker=".", label=f"{method} (lr {s['best_lr']:g})")
        mine = sorted((r for r in runs if r["method"] == method and r["status"] == "ok"),
                      key=lambda r: r["lr"])
        if mine:
            right.plot([r["lr"] for r in mine], [r["eval_loss"] for r in mine], style,
                       color=colors[method], marker="o", label=method)
    left.set_xlabel("tokens")
    left.set_ylabel("eval loss (nats/token)")
    left.set_title(f"eval loss vs tokens, best lr per method ({settings['preset']}, "
                   f"{settings['device']})")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel("peak learning rate")
    right.set_ylabel("final eval loss")
    right.set_title("learning-rate sweep (slimopt solid, peers dashed)")
    right.legend(fontsize=7, ncol=2)
    if finals:
        low = min(finals)
        right.set_ylim(low - 0.05, min(max(finals), low + 2.0) + 0.05)
        shown = [float(y) for line in left.get_lines() for y in line.get_ydata()]
        if shown:
            left.set_ylim(low - 0.05, min(max(shown), low + 3.0) + 0.05)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------- entry point
def run(args, folder: str, info: dict) -> list[str]:
    try:
        plan = resolve(args)
    except ValueError as err:
        say(f"error: {err}")
        raise SystemExit(2) from None
    settings = pretrain_settings(plan["flags"])
    work_dir = plan["work_dir"]
    temporary = work_dir is None
    if temporary:
        work_dir = tempfile.mkdtemp(prefix="slimopt-convergence-")
    os.makedirs(work_dir, exist_ok=True)
    t0 = time.time()
    try:
        data_info = prepare_data(settings)
        n_runs = sum(len(v) for v in plan["lrs"].values())
        say(f"{n_runs} runs ({len(plan['methods'])} methods), preset {plan['preset']}, "
            f"{settings.steps} steps x {settings.batch_size} x {settings.seq_len} tokens, "
            f"{plan['jobs']} at a time x {plan['threads']} thread(s), device {plan['device']}; "
            f"corpus {data_info['corpus']}: {data_info['train_tokens']:,} train / "
            f"{data_info['eval_tokens']:,} eval tokens; logs under {work_dir}")
        runs = sweep(plan["methods"], plan["lrs"], plan["flags"], work_dir, jobs=plan["jobs"],
                     env=_env(plan["device"], plan["threads"]), timeout=plan["timeout"])
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    best = select_best(runs)
    params = next((r["params"] for r in runs if r.get("params")), None)
    st = dict(preset=plan["preset"], device=plan["device"], quick=plan["quick"],
              params=params or 0, steps=settings.steps, batch_size=settings.batch_size,
              seq_len=settings.seq_len, tokens_per_run=settings.steps * settings.batch_size
              * settings.seq_len, warmup=settings.warmup, min_lr_ratio=settings.min_lr_ratio,
              rank=settings.rank, update_interval=settings.update_interval,
              eval_every=settings.eval_every, eval_batches=settings.eval_batches,
              max_chars=settings.max_chars, jobs=plan["jobs"], threads=plan["threads"],
              lrs={m: plan["lrs"][m] for m in plan["methods"]}, pretrain_flags=plan["flags"],
              wall_s=time.time() - t0, **data_info)
    if temporary:
        for r in runs:
            r["log"] = None  # removed with the temporary work dir (failed runs keep log_tail)
    data = dict(settings=st, runs=runs, best=best)
    return report.write(folder, "convergence", info, _clean(data), table(best, st),
                        figure(runs, best, st))
