"""Convergence suite: training loss and eval perplexity vs tokens for every slimopt optimizer and
every peer, each at a learning-rate sweep, over one or more seeds and corpora, trained by
``slimopt-pretrain``.

What runs: for every method, every learning rate of its grid and every seed, one
``slimopt-pretrain`` run (``--optimizer METHOD --lr LR --seed SEED`` and the settings below; LLaMA
model of the preset, cosine schedule with linear warmup to 10% of the peak, gradient clipping at
1.0, weight decay 0, the GaLore parameter split). The seed sets both the initial weights and the
order of the batches, so runs of one seed share both across methods and lrs. Its ``result.json``
gives the final eval loss, the optimizer-state bytes and the loss curve (``curve``: step, tokens,
mean train loss since the previous point, eval loss at every ``--eval-every`` step and the last).

- Methods: those whose record (``slimopt.launch.records``) names the convergence suite: the
  slimopt optimizers and the peers except ``adamw-fused`` (the same math as ``adamw``).
- Learning rates: a half-decade ladder (1, 3, 10, 30, ...) around a per-method centre, 4 points by
  default (``--convergence-grid``; an even count has one more point above the centre than below:
  in the first 3-point sweep 9 of 15 best lrs were the highest tried). Centre 3e-3 (grid 1e-3,
  3e-3, 1e-2, 3e-2) for the Adam-like methods, Muon and ROOT (RMS-matched to AdamW), GaLore-torch
  (which applies its scale 0.25 itself), APOLLO, APOLLO-Mini, Fira and Adafactor (external lr, no
  relative step); centre 3e-2 (grid 1e-2, 3e-2, 1e-1, 3e-1) for SNSM, SubspaceMomentum and
  SubsetNorm, whose paper uses ~10x Adam's lr. ``--convergence-lrs`` gives every method the same
  list instead.
- Edges: a best lr at the lowest or highest lr tried is marked ↓edge / ↑edge in the table (the
  optimum may lie beyond it; a failed, e.g. diverged, run at the next lr counts as tried and
  brackets it). ``--convergence-extend-edges`` then runs the next ladder lr beyond that edge
  (with the same seeds as the grid), and again if the new lr is best in turn: at most 2 lrs
  added per method, named in the caption; a mark left after that stays in the table.
- Seeds: ``--convergence-seeds 0 1`` (default 0). ``--convergence-seed-policy all`` (default):
  every (method, lr) with every seed. ``best`` (cheaper: grid + one run per method and extra
  seed): the first seed runs the grid (and the edge extensions), the other seeds only rerun each
  method's best lr. The caption says which policy ran. The seed is ``slimopt-pretrain --seed``:
  the initial weights, the data order and the random draws of the slimopt optimizers with a
  ``seed`` option (GrassJump's and GrassWalk's bases, SARA, GaLore-slimopt, SNSM,
  SubspaceMomentum); the peers draw nothing at random.
- Selection: a method's best lr is the one with the lowest mean final eval loss over the seeds
  that ran at every lr tried (all seeds under policy all, the first under policy best); an lr
  where one of those runs failed is not chosen. The table gives, at the best lr, the mean over
  every seed that ran there, its spread (± half the range, with the seed count; min and max in
  the JSON) and exp(mean) as the perplexity, and below it every lr's mean loss. The eval split
  (the last 2% of the corpus's documents, held out from training) is also the split reported:
  there is no separate test split on these short runs, so the best-of-grid numbers are slightly
  optimistic, alike for every method.
- Corpora: ``--convergence-corpus stdlib fortunes`` runs the whole suite once per corpus, one
  after the other. ``stdlib`` (default): the Python standard library's source (code).
  ``fortunes``: English prose, the ~15,000 epigrams, quotations and poems of Debian's
  ``fortunes`` package (``slimopt-pretrain --data fortunes``; ``apt-get install fortunes``; ~2.5
  MB, one document per fortune, ~0.93M train and ~20k held-out tokens at vocab 2048; a missing
  package stops the suite before any run). Each corpus trains its own tokenizer. Results of
  other corpora and presets sit side by side: ``convergence.*`` for stdlib at the device's
  default preset, ``convergence-fortunes.*`` for fortunes, ``-PRESET`` added for another preset
  (``convergence-fortunes-small.*``), and ``-TAG`` for ``--convergence-tag TAG`` (a variant,
  e.g. an optimizer option set by ``--opt-args``). ``--data`` in
  ``--convergence-pretrain-args`` (your own corpus) replaces ``--convergence-corpus`` and writes
  ``convergence.*``.
- Settings: CPU (``--device cpu``, default): the ``tiny`` preset's defaults (1.3M parameters, 200
  steps of 16 x 128 tokens = 409,600 tokens, rank 32, update interval 50, warmup 20), evaluated
  every 25 steps (8 batches of 16 x 128 held-out tokens); ~1.5 min a run on one core (Muon and
  ROOT ~4x). ``--convergence-preset small``: the same run on a 4x larger model (4.2M parameters:
  hidden 256, 4 layers; rank 64), ~5 min a run on one core, ~20 for Muon and ROOT. GPU
  (``--device cuda``): the ``60m`` preset (rank 128) for 500 steps of 64 x 256 tokens (8.2M
  tokens, about two passes over the stdlib corpus at a 32k vocabulary: pass
  ``--convergence-pretrain-args="--data CORPUS"`` for a real one), warmup 50, update interval
  100, eval every 50 steps. ``--convergence-preset`` picks another preset;
  ``--convergence-steps``, ``--convergence-eval-every`` and ``--convergence-pretrain-args`` (any
  ``slimopt-pretrain`` flags, appended last so they win, e.g. ``--opt-args`` JSON for optimizer
  options; write it with ``=`` since its value starts with ``--``; ``--seed`` there is refused:
  use ``--convergence-seeds``) override the settings.
- ``--quick``: one lr per method (the centre) and tiny runs: 8 steps of 8 x 64 tokens, eval
  every 4 steps on 2 batches, update interval 4, the first 400k characters of the corpus.
  Seeds, corpora and the seed policy apply as usual.
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
  sweep at 3 lrs (45 runs) took 70 minutes on 2 shared cores; at 4 lrs expect ~95 minutes per
  corpus and seed, plus ~20 minutes per extra seed under policy best. The grid, the edge
  extensions and the extra seeds are separate rounds: a round's last runs may leave a core idle.
- Robustness: each run's stdout/stderr goes to ``train.log`` in its own folder
  (``CORPUS/METHOD-lrLR-seedSEED``) under a temporary work dir (``--convergence-work-dir`` to
  keep it); a run that exits non-zero, raises, takes its worker down, times out
  (``--convergence-timeout``; its worker is killed and replaced) or reports a non-finite loss is
  recorded as failed with the last lines of its log, and the suite carries on. Checkpoints are
  deleted after each run. A method name the registry does not know, a learning rate that is not
  a finite positive number, a seed named twice or a corpus that is not installed is refused
  before anything runs.

Writes, per corpus, ``NAME.json`` (settings, every run with its seed and curve, the best lr per
method with its mean, min and max), ``NAME.md`` (the table) and ``NAME.png`` (left: eval loss vs
tokens at each method's best lr, mean over seeds, slimopt solid, peers dashed; right: final eval
loss vs lr, mean and min-max over seeds).

    python -m benchmarks convergence                        # CPU, tiny preset, 4 lrs per method
    python -m benchmarks convergence --quick --out /tmp/cv  # smoke test
    python -m benchmarks convergence --convergence-methods grasswalk adamw --convergence-lrs 3e-3
    python -m benchmarks convergence --convergence-corpus stdlib fortunes \\
        --convergence-seeds 0 1 --convergence-seed-policy best --convergence-extend-edges
    python -m benchmarks convergence --convergence-methods grassjump --convergence-tag \\
        norecovery --convergence-pretrain-args='--opt-args {\\"recovery\\":false}'  # an option
    python -m benchmarks convergence --device cuda          # 60m preset
"""
from __future__ import annotations

import json
import math
import os
import re
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

#: the corpora the suite knows: name -> slimopt-pretrain's ``--data`` (None: its default)
CORPORA = {"stdlib": None, "fortunes": "fortunes"}
KIND = {"stdlib": "Python source", "fortunes": "English prose", "custom": "--data"}
DEFAULT_GRID = 4
#: ``--convergence-extend-edges``: at most this many lrs added beyond an edge, per method
MAX_EXTENSIONS = 2
#: per preset: the suite's changes to the preset's training defaults
PRESET_SETTINGS = {
    "tiny": dict(eval_every=25),
    "small": dict(eval_every=25),
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
                            f"(default {DEFAULT_GRID}; 1 with --quick)")
    group.add_argument("--convergence-extend-edges", action="store_true",
                       help="when a method's best lr is the lowest/highest it was tried at, try "
                            f"the next lr of the ladder beyond it (up to {MAX_EXTENSIONS} times)")
    group.add_argument("--convergence-seeds", nargs="+", type=int, metavar="SEED",
                       help="seeds (initial weights and data order) of every run; the table "
                            "gives the mean and spread over them (default: 0)")
    group.add_argument("--convergence-seed-policy", choices=("all", "best"), default="all",
                       help="all: every (method, lr) with every seed; best: the first seed runs "
                            "the whole grid, the others only each method's best lr (default all)")
    group.add_argument("--convergence-corpus", nargs="+", choices=tuple(CORPORA),
                       metavar="NAME",
                       help="corpora, one suite each, results side by side (convergence.* for "
                            "stdlib, convergence-fortunes.* for fortunes); stdlib: Python "
                            "source (default), fortunes: English prose (apt-get install fortunes)")
    group.add_argument("--convergence-tag", metavar="TAG",
                       help="added to the results' names (convergence-TAG.md, ...), so that a "
                            "variant, e.g. an ablation by --opt-args, keeps the plain results")
    group.add_argument("--convergence-preset",
                       help="model preset (default: tiny on CPU, 60m on GPU, tiny with --quick; "
                            "small: 4.2M parameters, ~4x tiny's time)")
    group.add_argument("--convergence-steps", type=int, help="training steps per run")
    group.add_argument("--convergence-eval-every", type=int, help="steps between curve points")
    group.add_argument("--convergence-pretrain-args", default="", metavar="FLAGS",
                       help="extra slimopt-pretrain flags for every run, one string given "
                            "with '=' (its value starts with --), e.g. "
                            "--convergence-pretrain-args='--max-chars 1000000 --opt-args "
                            "{\\\"recovery\\\":false}'")
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
def _rung(k: int) -> float:
    """Rung ``k`` of the half-decade ladder: 1e0 for 0, 3e0 for 1, 1e1 for 2, 3e-1 for -1, ..."""
    return float(f"{1 if k % 2 == 0 else 3}e{k // 2}")


def lr_grid(centre: float, points: int) -> list[float]:
    """``points`` learning rates of the half-decade ladder ..., 1e-3, 3e-3, 1e-2, 3e-2, ...
    around ``centre`` (rounded onto the ladder); an even count has one more rung above it than
    below (4 around 3e-3: 1e-3, 3e-3, 1e-2, 3e-2)."""
    k = round(2 * math.log10(centre))
    lo = k - (points - 1) // 2
    return [_rung(j) for j in range(lo, lo + points)]


def beyond(lr: float, direction: int) -> float:
    """The first ladder rung strictly above (``direction`` 1) or below (-1) ``lr``."""
    k = round(2 * math.log10(lr)) - direction
    while True:
        k += direction
        value = _rung(k)
        if (value > lr * 1.0001) if direction > 0 else (value < lr / 1.0001):
            return value


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


def _named(flags: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in flags)


def _corpora_and_seeds(args, extra: list[str]) -> tuple[list[str], list[int]]:
    """The corpora and seeds to run, refusing pretrain flags that would silently undo them."""
    seeds = list(args.convergence_seeds or [0])
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed is named twice in --convergence-seeds {seeds}")
    if min(seeds) < 0:
        raise ValueError(f"--convergence-seeds must be >= 0, got {seeds}")
    if _named(extra, "--seed"):
        raise ValueError("--seed in --convergence-pretrain-args: use --convergence-seeds")
    corpora = list(dict.fromkeys(args.convergence_corpus or ["stdlib"]))
    if _named(extra, "--data"):
        if args.convergence_corpus:
            raise ValueError("--data in --convergence-pretrain-args and --convergence-corpus: "
                             "name the corpus one way")
        corpora = ["custom"]  # the --data of the pretrain flags; results named as for stdlib
    return corpora, seeds


def resolve(args) -> dict:
    """The suite's plan from the command line: methods, lrs, corpora, seeds, pretrain flags
    (per corpus), jobs, threads."""
    device = args.device
    on_gpu = device.startswith("cuda")
    quick = bool(getattr(args, "quick", False))
    default_preset = "60m" if on_gpu and not quick else "tiny"
    preset = args.convergence_preset or default_preset
    from slimopt.launch.presets import PRESETS
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    methods = [m.lower() for m in (args.convergence_methods or METHODS)]
    if len(set(methods)) != len(methods):
        raise ValueError(f"a method is named twice in {methods}")
    points = args.convergence_grid or (1 if quick else DEFAULT_GRID)
    if points < 1:
        raise ValueError(f"--convergence-grid must be >= 1, got {points}")
    if args.convergence_lrs:
        lrs = {m: list(args.convergence_lrs) for m in methods}
    else:
        lrs = {m: lr_grid(LR_CENTRE.get(m, 3e-3), points) for m in methods}
    check_methods_and_lrs(methods, lrs)
    extra = shlex.split(args.convergence_pretrain_args or "")
    corpora, seeds = _corpora_and_seeds(args, extra)
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
    data = {c: ["--data", CORPORA[c]] if CORPORA.get(c) else [] for c in corpora}
    return dict(device=device, preset=preset, quick=quick, methods=methods, lrs=lrs,
                corpora=corpora, seeds=seeds, seed_policy=args.convergence_seed_policy,
                extend_edges=bool(args.convergence_extend_edges),
                flags={c: flags + data[c] + extra for c in corpora}, extra=extra, jobs=jobs,
                threads=threads, timeout=args.convergence_timeout,
                work_dir=args.convergence_work_dir,
                names={c: output_name(c, preset, default_preset, _tag(args)) for c in corpora})


def _tag(args) -> str | None:
    tag = getattr(args, "convergence_tag", None)
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", tag):
        raise ValueError(f"--convergence-tag {tag!r}: use letters, digits, '-', '_' and '.'")
    return tag


def output_name(corpus: str, preset: str, default_preset: str, tag: str | None = None) -> str:
    """``convergence`` for the default corpus and preset, with ``-CORPUS``, ``-PRESET`` and
    ``-TAG`` added otherwise, so that results of other corpora, presets and variants sit side by
    side."""
    name = "convergence"
    if corpus not in ("stdlib", "custom"):
        name += f"-{corpus}"
    if preset != default_preset:
        name += f"-{preset}"
    return name + (f"-{tag}" if tag else "")


def pretrain_settings(flags: list[str]):
    """slimopt-pretrain's parsed arguments for ``flags`` (every default filled in); its own
    checks apply (a bad flag is its one-line error and SystemExit 2)."""
    from slimopt.launch.pretrain import parse_args
    return parse_args(flags + ["--optimizer", "adamw", "--output-dir", os.devnull])


def prepare_data(settings) -> dict:
    """Train the tokenizer and pack the tokens once, into the shared cache, before the runs start
    (so parallel runs do not all do it); returns the corpus figures."""
    from slimopt.launch.run_setup import load_data
    train, held, tokenizer = load_data(settings, say=lambda *a: None)
    record = train.shards.record
    return dict(corpus=record["corpus_id"], documents=record["documents"],
                train_tokens=train.numel(), eval_tokens=held.numel(), vocab=tokenizer.vocab_size)


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
              timeout: float | None = None, seed: int = 0) -> dict:
    """One ``slimopt-pretrain FLAGS --optimizer METHOD --lr LR --seed SEED --output-dir FOLDER``
    run in ``runner``; never raises for a failed run: the row says ``status`` "ok" or "failed"
    (with ``error`` and the log's last lines)."""
    os.makedirs(folder, exist_ok=True)
    log = os.path.join(folder, "train.log")
    argv = [*flags, "--optimizer", method, "--lr", repr(lr), "--seed", str(seed),
            "--output-dir", folder]
    row = dict(method=method, library=LIBRARY.get(method, "?"), lr=lr, seed=seed,
               status="failed", error=None, eval_loss=None, eval_perplexity=None, state_bytes=None,
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


def sweep(methods, lrs_by_method, flags, work_dir, *, seeds=(0,), jobs=1, env=None,
          timeout=None) -> list:
    """Train every (method, lr, seed) on ``jobs`` worker processes; rows in (method, lr, seed)
    order. Progress lines go to stderr."""
    import queue
    check_methods_and_lrs(methods, lrs_by_method)
    tasks = [(i, m, lr, seed) for i, (m, lr, seed) in
             enumerate((m, lr, seed) for m in methods for lr in lrs_by_method[m]
                       for seed in seeds)]
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
                    index, method, lr, seed = todo.get_nowait()
                except queue.Empty:
                    return
                if current is None or not current.ready:
                    if current is not None:
                        current.close()
                    current = Worker(env, work_dir, os.path.join(work_dir, f"worker{number}.log"))
                folder = os.path.join(work_dir, f"{method}-lr{lr:g}-seed{seed}")
                row = train_one(method, lr, flags, folder, current, timeout, seed)
                with lock:
                    rows[index] = row
                    head = (f"{method} lr {lr:g} seed {seed} "
                            f"[{sum(r is not None for r in rows)}/{len(rows)}]")
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
def _good(row) -> bool:
    return row["status"] == "ok" and _finite(row.get("eval_loss"))


def _mean(values):
    return sum(values) / len(values)


def _scores(mine) -> tuple[dict, list]:
    """Per lr tried: the mean final eval loss over the seeds that ran at every lr (None when one
    of those failed: an lr that diverges on one seed is not a stable choice); and those seeds."""
    tried = sorted({r["lr"] for r in mine})
    seeds_at = [{r.get("seed", 0) for r in mine if r["lr"] == lr} for lr in tried]
    common = set.intersection(*seeds_at) or set.union(*seeds_at)
    scores = {}
    for lr in tried:
        rows = [r for r in mine if r["lr"] == lr and r.get("seed", 0) in common]
        scores[lr] = _mean([r["eval_loss"] for r in rows]) if rows and all(
            _good(r) for r in rows) else None
    return scores, sorted(common)


def select_best(runs) -> dict:
    """Per method (in first-seen order): its best lr = the lowest mean final eval loss over the
    seeds that ran at every lr it was tried at (see ``_scores``), and at that lr the mean, min
    and max over every seed that succeeded there, with ``edge`` "low"/"high" when that lr is the
    lowest/highest lr the method was tried at (failed runs count as tried: a diverged higher lr
    brackets the optimum), None otherwise or when only one lr was tried."""
    best = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        tried = sorted({r["lr"] for r in mine})
        failed = [dict(lr=r["lr"], seed=r.get("seed", 0), error=r.get("error"))
                  for r in mine if not _good(r)]
        scores, common = _scores(mine)
        ranked = sorted((loss, lr) for lr, loss in scores.items() if loss is not None)
        if not ranked:
            best[method] = dict(status="failed", library=mine[0].get("library"), lrs=tried,
                                failed=failed)
            continue
        lr = ranked[0][1]
        top = [r for r in mine if r["lr"] == lr and _good(r)]
        losses = [r["eval_loss"] for r in top]
        edge = None
        if len(tried) > 1:
            edge = "low" if lr == tried[0] else "high" if lr == tried[-1] else None
        best[method] = dict(
            status="ok", library=top[0].get("library"), best_lr=lr, edge=edge, lrs=tried,
            eval_loss=_mean(losses), eval_loss_min=min(losses), eval_loss_max=max(losses),
            seeds=sorted(r.get("seed", 0) for r in top), selection_seeds=common,
            eval_perplexity=math.exp(_mean(losses)), state_bytes=top[0].get("state_bytes"),
            adamw_state_bytes=top[0].get("adamw_state_bytes"),
            seconds=_mean([r["seconds"] for r in top]) if all(
                _finite(r.get("seconds")) for r in top) else None, tokens=top[0].get("tokens"),
            eval_loss_by_lr={f"{x:g}": _by_lr(mine, x) for x in tried}, failed=failed)
    return best


def _by_lr(mine, lr) -> dict | None:
    """Mean final eval loss at ``lr`` over the seeds that succeeded there, and their count."""
    losses = [r["eval_loss"] for r in mine if r["lr"] == lr and _good(r)]
    return dict(mean=_mean(losses), seeds=len(losses)) if losses else None


def lr_cell(summary: dict) -> str:
    cell = f"{summary['best_lr']:g}"
    if summary.get("edge") == "low":
        cell += " ↓edge"
    elif summary.get("edge") == "high":
        cell += " ↑edge"
    elif len(summary.get("lrs", ())) == 1:
        cell += " (no sweep)"
    return cell


def spread_cell(summary: dict) -> str:
    """``± half the range (n seeds)`` over the seeds at the best lr; ``-`` for one seed."""
    n = len(summary.get("seeds", ()))
    if n < 2:
        return "-"
    return f"± {(summary['eval_loss_max'] - summary['eval_loss_min']) / 2:.4f} ({n} seeds)"


def sweep_lines(best: dict) -> list[str]:
    """One line per method: final eval loss (mean over its seeds) at every lr it was tried at,
    the best starred."""
    lines = ["", "Final eval loss at every lr tried (mean over the seeds run there, their "
             "count in brackets when more than one; * the best):", ""]
    for method, s in best.items():
        cells = []
        for lr in s["lrs"]:
            got = s.get("eval_loss_by_lr", {}).get(f"{lr:g}")
            cell = "failed" if got is None else f"{got['mean']:.4f}" + (
                f" ({got['seeds']})" if got["seeds"] > 1 else "")
            cells.append(f"{lr:g}: {cell}{'*' if lr == s.get('best_lr') else ''}")
        lines.append(f"- {method}: " + " · ".join(cells))
    return lines


def seed_note(st: dict) -> str:
    """What the seeds and the seed policy did, for the table's caption."""
    seeds = st.get("seeds", [0])
    text = f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (initial " \
           "weights, data order and the slimopt optimizers' random draws)"
    if len(seeds) == 1:
        return text + "; one run per (method, lr), so no spread."
    if st.get("seed_policy") == "merged":
        return (text + "; pooled from several runs of the suite (below): best lr = lowest mean "
                "over the seeds that ran at every lr tried, eval loss = mean over the seeds at "
                "the best lr, spread = ± half their range.")
    if st.get("seed_policy") == "best":
        return (text + f"; seed policy best: seed {seeds[0]} ran every lr and chose each "
                f"method's best lr, the other seeds reran only that lr. Eval loss = mean over "
                "the seeds at the best lr; spread = ± half their range.")
    return (text + "; seed policy all: every (method, lr) ran with every seed; best lr = lowest "
            "mean over the seeds. Eval loss = that mean; spread = ± half the seeds' range.")


def table(best: dict, settings: dict) -> str:
    base = best.get("adamw", {})
    base_loss = base.get("eval_loss") if base.get("status") == "ok" else None
    rows = sorted((s for s in best.items() if s[1]["status"] == "ok"),
                  key=lambda item: item[1]["eval_loss"])
    lines = ["| method | library | best lr | eval loss | seed spread | eval ppl | loss / AdamW's "
             "| state bytes (% of AdamW) | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for method, s in rows:
        ratio = f"{s['eval_loss'] / base_loss:.3f}" if base_loss else "-"
        share = (f"{s['state_bytes']:,} ({100 * s['state_bytes'] / s['adamw_state_bytes']:.0f}%)"
                 if s.get("state_bytes") is not None and s.get("adamw_state_bytes") else "-")
        seconds = f"{s['seconds']:.0f}" if _finite(s.get("seconds")) else "-"
        lines.append(f"| {method} | {s['library']} | {lr_cell(s)} | {s['eval_loss']:.4f} | "
                     f"{spread_cell(s)} | {s['eval_perplexity']:.1f} | {ratio} | {share} | "
                     f"{seconds} |")
    for method, s in best.items():
        if s["status"] != "ok":
            lines.append(f"| {method} | {s['library']} | all failed | - | - | - | - | - | - |")
    failures = [f"{m} lr {f['lr']:g} seed {f.get('seed', 0)} ({f['error']})"
                for m, s in best.items() for f in s.get("failed", [])]
    notes = caption(settings)
    if failures:
        notes.append("Failed runs: " + "; ".join(failures) + ".")
    return "\n".join(lines + notes + sweep_lines(best))


def caption(st: dict) -> list[str]:
    extended = st.get("extended") or {}
    grown = "; ".join(f"{m} {', '.join(f'{x:g}' for x in lrs)}" for m, lrs in extended.items())
    return [
        "",
        f"Preset `{st['preset']}` ({st['params']:,} parameters) on "
        f"{st.get('corpus_name', 'the corpus')} ({KIND.get(st.get('corpus_name'), 'text')}; "
        f"`{st['corpus']}`, vocab {st['vocab']:,}), {st['steps']} steps of "
        f"{st['batch_size']} x {st['seq_len']} tokens = {st['tokens_per_run']:,} tokens per "
        f"run, warmup {st['warmup']}, cosine to {st['min_lr_ratio']:g} x lr, rank "
        f"{st['rank']}, update interval {st['update_interval']}; eval loss = mean "
        f"cross-entropy (nats/token) on {st['eval_batches']} "
        f"batch{'es' if st['eval_batches'] != 1 else ''} of held-out tokens "
        f"({st['eval_every']} steps between curve points), at the last step; device "
        f"{st['device']}; {st['jobs']} runs at a time x {st['threads']} thread(s).",
        seed_note(st)
        + (f" Added to every run: `{' '.join(map(shlex.quote, st['extra_flags']))}`."
           if st.get("extra_flags") else ""),
        "Best lr = lowest (mean) final eval loss over the sweep; the eval split is also the split "
        "reported (no separate test split). ↓edge / ↑edge: the best lr is the lowest / highest "
        "lr tried, so the optimum may lie beyond the sweep"
        + (f" (edges extended: up to {MAX_EXTENSIONS} lrs added beyond an edge best"
           f"{': ' + grown if grown else ', none needed'})" if st.get("extend_edges") else "")
        + ". Loss / AdamW's: eval loss divided by AdamW's best, at equal tokens. State bytes: "
        "the optimizer's state against what torch AdamW holds for the same model. Train s: the "
        "training loop's wall time (evaluations included, start-up excluded).",
    ]


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
            tokens, losses = mean_curve([r for r in runs if r["method"] == method
                                         and r["lr"] == s["best_lr"] and _good(r)])
            left.plot(tokens, losses, style, color=colors[method], marker=".",
                      label=f"{method} (lr {s['best_lr']:g})")
        mine = [r for r in runs if r["method"] == method and _good(r)]
        lrs = sorted({r["lr"] for r in mine})
        if lrs:
            at = [[r["eval_loss"] for r in mine if r["lr"] == lr] for lr in lrs]
            mid = [_mean(v) for v in at]
            right.errorbar(lrs, mid, yerr=[[m - min(v) for m, v in zip(mid, at)],
                                           [max(v) - m for m, v in zip(mid, at)]],
                           fmt=style, color=colors[method], marker="o", capsize=2, label=method)
    left.set_xlabel("tokens")
    left.set_ylabel("eval loss (nats/token)")
    left.set_title(f"eval loss vs tokens at each best lr, mean over seeds\n"
                   f"({settings['preset']}, {settings.get('corpus_name', settings['corpus'])}, "
                   f"{settings['device']})")
    left.legend(fontsize=7, ncol=2)
    right.set_xscale("log")
    right.set_xlabel("peak learning rate")
    right.set_ylabel("final eval loss")
    right.set_title("final eval loss vs lr: mean and min-max over seeds\n"
                    "(slimopt solid, peers dashed)")
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


def mean_curve(rows) -> tuple[list, list]:
    """``(tokens, mean eval loss)`` at the curve points every run of ``rows`` has."""
    by_tokens = {}
    for r in rows:
        for p in r.get("curve") or []:
            if _finite(p.get("eval_loss")):
                by_tokens.setdefault(p["tokens"], []).append(p["eval_loss"])
    shared = sorted(t for t, v in by_tokens.items() if len(v) == len(rows))
    return shared, [_mean(by_tokens[t]) for t in shared]


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
def campaign(plan: dict, go) -> list:
    """Every run of one corpus: the grid (with the first seed only under seed policy best, else
    every seed), lrs added beyond edge bests (``--convergence-extend-edges``), then the other
    seeds at each method's best lr (policy best). ``go(methods, lrs, seeds)`` runs a sweep."""
    seeds = plan["seeds"]
    first = seeds[:1] if plan["seed_policy"] == "best" else seeds
    runs = go(plan["methods"], plan["lrs"], first)
    for _ in range(MAX_EXTENSIONS if plan["extend_edges"] else 0):
        more = {m: [beyond(s["best_lr"], 1 if s["edge"] == "high" else -1)]
                for m, s in select_best(runs).items() if s["status"] == "ok" and s["edge"]}
        if not more:
            break
        say("best lr at an edge, trying one more: " + ", ".join(
            f"{m} {lrs[0]:g}" for m, lrs in more.items()))
        runs += go(list(more), more, first)
    rest = [seed for seed in seeds if seed not in first]
    todo = {m: [s["best_lr"]] for m, s in select_best(runs).items() if s["status"] == "ok"}
    if rest and todo:
        say(f"seeds {', '.join(map(str, rest))} at each method's best lr")
        runs += go(list(todo), todo, rest)
    return runs


def run_corpus(plan: dict, corpus: str, folder: str, info: dict) -> list[str]:
    """The suite on one corpus: prepare its data, run the campaign, write the results."""
    flags = plan["flags"][corpus]
    settings = pretrain_settings(flags)
    work_dir = plan["work_dir"]
    temporary = work_dir is None
    work_dir = tempfile.mkdtemp(prefix="slimopt-convergence-") if temporary else \
        os.path.join(work_dir, corpus)
    os.makedirs(work_dir, exist_ok=True)
    t0 = time.time()
    try:
        data_info = prepare_data(settings)
        say(f"{len(plan['methods'])} methods x {len(plan['seeds'])} seed(s), preset "
            f"{plan['preset']}, {settings.steps} steps x {settings.batch_size} x "
            f"{settings.seq_len} tokens, {plan['jobs']} at a time x {plan['threads']} "
            f"thread(s), device {plan['device']}; corpus {data_info['corpus']}: "
            f"{data_info['train_tokens']:,} train / {data_info['eval_tokens']:,} eval tokens; "
            f"logs under {work_dir}")
        env = _env(plan["device"], plan["threads"])
        runs = campaign(plan, lambda methods, lrs, seeds: sweep(
            methods, lrs, flags, work_dir, seeds=seeds, jobs=plan["jobs"], env=env,
            timeout=plan["timeout"]))
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    best = select_best(runs)
    st = summary_settings(plan, settings, runs, data_info, flags)
    st.update(wall_s=time.time() - t0, corpus_name=corpus)
    if temporary:
        for r in runs:
            r["log"] = None  # removed with the temporary work dir (failed runs keep log_tail)
    data = dict(settings=st, runs=runs, best=best)
    return report.write(folder, plan["names"][corpus], info, _clean(data), table(best, st),
                        figure(runs, best, st))


def summary_settings(plan: dict, settings, runs: list, data_info: dict, flags: list) -> dict:
    """The settings block of the JSON and the table's caption."""
    params = next((r["params"] for r in runs if r.get("params")), None)
    tried = {m: sorted({r["lr"] for r in runs if r["method"] == m}) for m in plan["methods"]}
    extended = {m: [x for x in tried[m] if x not in plan["lrs"][m]] for m in plan["methods"]}
    return dict(preset=plan["preset"], device=plan["device"], quick=plan["quick"],
                params=params or 0, steps=settings.steps, batch_size=settings.batch_size,
                seq_len=settings.seq_len, tokens_per_run=settings.steps * settings.batch_size
                * settings.seq_len, warmup=settings.warmup, min_lr_ratio=settings.min_lr_ratio,
                rank=settings.rank, update_interval=settings.update_interval,
                eval_every=settings.eval_every, eval_batches=settings.eval_batches,
                max_chars=settings.max_chars, jobs=plan["jobs"], threads=plan["threads"],
                seeds=plan["seeds"], seed_policy=plan["seed_policy"],
                extend_edges=plan["extend_edges"], lrs=tried,
                extended={m: v for m, v in extended.items() if v},
                pretrain_flags=flags, extra_flags=plan.get("extra", []), **data_info)


def run(args, folder: str, info: dict) -> list[str]:
    try:
        plan = resolve(args)
    except ValueError as err:
        say(f"error: {err}")
        raise SystemExit(2) from None
    from slimopt.launch.data import DataError
    for corpus in plan["corpora"]:  # every corpus's data first: a missing one stops it all now
        try:
            prepare_data(pretrain_settings(plan["flags"][corpus]))
        except DataError as err:
            say(f"error: {err}")
            raise SystemExit(2) from None
    paths = []
    for corpus in plan["corpora"]:
        paths += run_corpus(plan, corpus, folder, info)
    return paths
