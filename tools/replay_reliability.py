#!/usr/bin/env python
"""Replay the reliability review's defective cases against a slimopt checkout.

The adversarial review of commit 81389d0 (``shared/reviews/reliability.md``) rated 892 cases;
this tool re-runs the 151 it did not rate OK or CLEAN (its SILENT, CRASH and LOSS rows; an A-row
counts once per optimizer class in its "classes" column) and classifies what it observes now with
the review's verdicts:

- OK: behaved as documented (a correct result, or a documented change such as a refused option
  that is now honoured);
- CLEAN: a clear error before any state change (CLI: exit code 2, one ``PROG: error: ...`` line on
  stderr, no traceback; API: a deliberately raised exception with a message, weights and optimizer
  state unchanged);
- SILENT: no error, wrong result (checked concretely: the lr applied, a marker file, the values
  loaded, ...);
- CRASH: a traceback from deep inside, a misleading or empty message, a traceback or exit code 1
  where the CLI promises a one-line exit-2 error, or an error raised after a partial update;
- LOSS: training work or persisted data lost;
- HANG: the case ran past its time limit.
- SKIP / ERROR: the case could not be run here / the replay itself failed (neither is a verdict).

    python tools/replay_reliability.py --repo PATH [--only A,C,R,K,D,L,SR] [--json OUT]

``PATH`` is a slimopt checkout (a worktree of an old commit, or the current tree): it goes first
on ``sys.path`` for the API cases, and the CLI cases run as subprocesses with ``PYTHONPATH=PATH``
in a scratch folder, so the repository is never written to. Cases run one after another
(``OMP_NUM_THREADS=1``, ``--threads 1``) with small settings; one checkpoint per family of resume
cases is made once and copied.

Where this replay cannot do what the review did, it says so in the observation: disk full is
simulated with ``RLIMIT_FSIZE`` (EFBIG) set on the running process instead of a 30 MB tmpfs; the
PDSH remote shell is DeepSpeed's ``PDSHRunner.get_cmd`` plus a local ``bash -c`` (as in the
review's reproduction); the rank-0 share of a 2-rank ZeRO state (A233) is cut out of a world-1
engine's state.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import glob
import io
import json
import linecache
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zipfile

sys.dont_write_bytecode = True  # importing the measured checkout must not write into it

VERDICTS = ("OK", "CLEAN", "SILENT", "CRASH", "LOSS", "HANG", "SKIP", "ERROR")
FAMILIES = ("A", "C", "R", "K", "D", "L", "SR")
ALL8 = ("GrassWalk", "GrassJump", "SARA", "GaLore", "SNSM", "SubspaceMomentum", "SubsetNorm",
        "ROOT")
RANKED = ALL8[:6]
# the CLI's small settings (as tests/test_pretrain.py): a 0.9M-parameter tiny LLaMA, seconds a run
SMALL = ["--preset", "tiny", "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
         "--max-chars", "150000", "--no-progress", "--no-tensorboard", "--threads", "1",
         "--eval-batches", "1"]
API_TIMEOUT = 120
CLI_TIMEOUT = 300


# ============================================================================ case registry
@dataclasses.dataclass
class Case:
    id: str
    cls: str
    family: str
    review: str
    fn: callable
    isolated: bool = False  # run in its own python process (DeepSpeed engines)


CASES: list[Case] = []


def case(cid, review, classes=("-",), isolated=False):
    family = re.match(r"[A-Z]+", cid).group(0)

    def register(fn):
        for cls in classes:
            CASES.append(Case(cid, cls, family, review, fn, isolated))
        return fn
    return register


class Outcome(Exception):
    """Raised (or returned) by a case: its verdict and a one-line observation."""

    def __init__(self, verdict, observation):
        super().__init__(observation)
        self.verdict, self.observation = verdict, observation


def out(verdict, observation):
    return Outcome(verdict, observation)


class CaseTimeout(BaseException):
    pass


# ============================================================================ context
class Ctx:
    def __init__(self, repo, scratch):
        self.repo = repo
        self.scratch = scratch
        self.cache = os.path.join(scratch, "cache")
        self.fixtures = {}
        os.makedirs(self.cache, exist_ok=True)
        self.env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                        DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
                        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1",
                        HF_DATASETS_CACHE=os.path.join(scratch, "hf-datasets"),
                        HF_HOME=os.path.join(scratch, "hf-home"))
        self.env.pop("PYTHONSTARTUP", None)

    def path(self, *parts):
        p = os.path.join(self.scratch, *parts)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        return p

    def dir(self, *parts):
        p = os.path.join(self.scratch, *parts)
        os.makedirs(p, exist_ok=True)
        return p

    def fixture(self, name, make):
        """``make()`` once; its result (or its failure, re-raised as ERROR) for every user."""
        if name not in self.fixtures:
            try:
                self.fixtures[name] = ("ok", make())
            except Outcome as o:
                self.fixtures[name] = ("fail", f"fixture {name}: {o.observation}")
            except Exception as err:  # noqa: BLE001 -- reported, not hidden
                self.fixtures[name] = ("fail", f"fixture {name}: {type(err).__name__}: {err}")
        kind, value = self.fixtures[name]
        if kind == "fail":
            raise out("ERROR", value)
        return value


# ============================================================================ subprocess helpers
@dataclasses.dataclass
class Proc:
    argv: list
    rc: int
    out: str
    err: str
    seconds: float
    timed_out: bool = False

    @property
    def text(self):
        return self.out + "\n" + self.err


def _kill_group(proc):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def run(ctx, argv, *, cwd=None, timeout=CLI_TIMEOUT, env=None, preexec=None, on_start=None):
    """Run ``argv`` in its own session (so a timeout kills its children too)."""
    t0 = time.time()
    argv = [str(a) for a in argv]
    proc = subprocess.Popen(argv, cwd=cwd or ctx.scratch, env=env or ctx.env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, preexec_fn=preexec)
    if on_start is not None:
        on_start(proc)
    try:
        o, e = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        o, e = proc.communicate()
        timed_out = True
    return Proc(list(argv), proc.returncode, o, e, time.time() - t0, timed_out)


def pretrain(ctx, *args, small=True, **kw):
    argv = [sys.executable, "-m", "slimopt.launch.pretrain"]
    if small:
        argv += SMALL + ["--cache-dir", ctx.cache]
    return run(ctx, argv + [str(a) for a in args], **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ctx, *args, ranks=2, **kw):
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port()), "-m", "slimopt.launch.pretrain", *SMALL,
            "--cache-dir", ctx.cache, *[str(a) for a in args]]
    return run(ctx, argv, **kw)


_NOISE = [re.compile(p) for p in (
    r"^\[\d{4}-\d\d-\d\d [\d:,.]+\]",          # DeepSpeed's logger
    r"^\[[WIE]\d{4} ",                          # c10 / glog lines
    r"^\s*warnings\.warn\(",
    r"^(W|I)\d{4} [\d:.]+ ",                    # torch.distributed.elastic's logger
    r"^\*{5,}",
    r"^Setting OMP_NUM_THREADS",
)]
_WARNING = re.compile(r"\b\w*Warning: ")
_ERROR_LINE = re.compile(r"^(\S+: )?error:")


def significant_stderr(err):
    """stderr without argparse's usage block, Python warnings and launcher/library log lines."""
    lines, in_usage, after_warning = [], False, False
    for line in err.splitlines():
        if not line.strip():
            in_usage = False
            continue
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line[:1].isspace():
            continue
        in_usage = False
        if _ERROR_LINE.match(line):
            lines.append(line)
            after_warning = False
            continue
        if _WARNING.search(line):
            after_warning = True
            continue
        if after_warning and line[:1].isspace():
            continue
        after_warning = False
        if any(p.search(line) for p in _NOISE):
            continue
        lines.append(line)
    return lines


_EMPTY_REASON = re.compile(r"\((\w+(Error|Exception)): ?\)\s*$|:\s*$")


def cli_error(proc, progs=("slimopt-pretrain",)):
    """Classify a failed CLI run: ``("clean", line)``, ``("empty", line)`` (an error line whose
    reason is empty), ``("traceback", last line)``, ``("rc", summary)`` (other non-zero exits),
    ``("ok", "")`` for exit code 0 or ``("hang", ...)``."""
    if proc.timed_out:
        return "hang", f"no exit after {proc.seconds:.0f} s"
    if proc.rc == 0:
        return "ok", ""
    last = last_line(proc.err)
    if "Traceback (most recent call last)" in proc.err:
        return "traceback", f"rc {proc.rc}, traceback: {exception_line(proc.err)}"
    sig = significant_stderr(proc.err)
    prefixes = tuple(f"{p}: error:" for p in progs) + ("error:",)
    errors = [l for l in sig if l.startswith(prefixes)]
    if proc.rc == 2 and len(errors) == 1 and len(sig) == 1:
        line = errors[0]
        reason = line.split("error:", 1)[1].strip()
        if not reason or _EMPTY_REASON.search(line):
            return "empty", line
        return "clean", line
    return "rc", f"rc {proc.rc}: {last}" + (f" (+{len(sig) - 1} other stderr lines)"
                                            if len(sig) > 1 else "")


def last_line(text):
    lines = [l for l in text.strip().splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""


def exception_line(err):
    """The ``Type: message`` line that ends the last traceback in ``err``."""
    lines = err.splitlines()
    start = max(i for i, l in enumerate(lines) if l.startswith("Traceback (most recent call"))
    idx = [i for i in range(start, len(lines)) if re.match(
        r"^[\w.]+(Error|Exception|Interrupt|Exit|StopIteration|Warning)\b", lines[i])]
    if not idx:
        return shorten(last_line(err))
    text = lines[idx[-1]]
    if text.rstrip().endswith(":"):  # the message continues on the next lines
        text += " " + " ".join(l.strip() for l in lines[idx[-1] + 1:idx[-1] + 3] if l.strip())
    return shorten(text)


def shorten(text, n=400):
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def steps_trained(proc):
    """Steps whose 'step N: train loss' line was printed (the CLI prints one per evaluation)."""
    return [int(s) for s in re.findall(r"^step (\d+)\b.*loss", proc.out, re.M)]


def verdict_for_refusal(proc, progs=("slimopt-pretrain",), what=""):
    """A run that should have been refused: CLEAN/CRASH from its exit, None if it ran (rc 0)."""
    kind, line = cli_error(proc, progs)
    if kind == "clean":
        return out("CLEAN", shorten(f"{what}rc 2: {line}"))
    if kind == "hang":
        return out("HANG", f"{what}{line}")
    if kind == "empty":
        return out("CRASH", shorten(f"{what}rc {proc.rc}, empty reason: {line}"))
    if kind in ("traceback", "rc"):
        return out("CRASH", shorten(f"{what}{line}"))
    return None


# ============================================================================ checkpoint helpers
def torch_load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=False)


def find_key(obj, key, depth=0):
    """The first value stored under ``key`` in nested dicts/lists (breadth-first-ish)."""
    if depth > 6:
        return None
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        values = obj.values()
    elif isinstance(obj, (list, tuple)):
        values = obj
    else:
        return None
    for v in values:
        if isinstance(v, (dict, list, tuple)):
            found = find_key(v, key, depth + 1)
            if found is not None:
                return found
    return None


def model_state(ckpt):
    m = ckpt.get("model") if isinstance(ckpt, dict) else None
    if m is None:
        m = find_key(ckpt, "model")
    return m


def group0(ckpt):
    groups = find_key(ckpt, "param_groups")
    return groups[0] if groups else {}


def checkpoint_step(path):
    try:
        ck = torch_load(path)
    except Exception as err:  # noqa: BLE001
        return None, f"unreadable ({type(err).__name__}: {shorten(err, 60)})"
    step = find_key(ck, "step")
    return step, None


# ============================================================================ API helpers
def slim():
    import slimopt
    return slimopt


def params_wb(seed=0, shapes=((16, 32), (32,))):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]


def make(name, params, **kw):
    kw.setdefault("lr", 1e-2)
    if name in RANKED:
        kw.setdefault("rank", 4)
        kw.setdefault("update_interval", 3)
    if name == "AdamW":
        import torch
        return torch.optim.AdamW(params, lr=kw["lr"])
    return getattr(slim(), name)(params, **kw)


def set_grads(params, seed):
    import torch
    g = torch.Generator().manual_seed(1000 + seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)


def train(opt, params, steps, seed=0):
    for i in range(steps):
        set_grads(params, seed + i)
        opt.step()


def clone_tree(obj):
    import torch
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {(k if not isinstance(k, torch.Tensor) else id(k)): clone_tree(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_tree(v) for v in obj) if not hasattr(obj, "_fields") else obj
    return copy.copy(obj)


def same(a, b):
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_meta:
            return True
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


def snapshot(opt, params):
    """Weights, per-parameter state (in ``params`` order) and the param groups' settings."""
    groups = []
    for g in opt.param_groups:
        groups.append({k: (clone_tree(v) if k != "params" else [id(p) for p in v])
                       for k, v in g.items()})
    return {"weights": [p.detach().clone() for p in params],
            "state": [clone_tree(opt.state[p]) if p in opt.state else None for p in params],
            "n_state": len(opt.state), "groups": groups}


def unchanged(before, opt, params):
    return same(before, snapshot(opt, params))


def _innermost(exc):
    tb, last = exc.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last


def clear_error(exc):
    """Whether ``exc`` is a deliberate, worded error: raised by a ``raise`` statement in Python
    code (not by a C++ kernel, an implicit ``KeyError``/``IndexError``/``AttributeError`` or a
    ``next()``), outside torch's internals (torch.optim and torch.serialization count as
    deliberate), with a non-empty message. Returns ``(bool, where)``."""
    if isinstance(exc, (StopIteration, AssertionError)):
        return False, type(exc).__name__
    last = _innermost(exc)
    if last is None:
        return False, "no traceback"
    fname = last.tb_frame.f_code.co_filename
    line = linecache.getline(fname, last.tb_lineno).strip()
    where = f"{os.path.basename(fname)}:{last.tb_lineno}"
    if not line.startswith("raise"):
        return False, where
    norm = fname.replace(os.sep, "/")
    if "/torch/" in norm and "/torch/optim/" not in norm and not norm.endswith(
            "/torch/serialization.py"):
        return False, where
    if not str(exc).strip() or str(exc).strip() in ("''", '""'):
        return False, where
    return True, where


def fmt(exc):
    return shorten(f"{type(exc).__name__}: {exc}", 120)


def finite(params):
    return all(bool(p.detach().float().isfinite().all()) for p in params)


def error_outcome(exc, before, opt, params, when=""):
    """CLEAN for a clear error that left weights and state untouched, else CRASH."""
    ok, where = clear_error(exc)
    kept = unchanged(before, opt, params) if before is not None else True
    if ok and kept:
        return out("CLEAN", f"{when}{fmt(exc)}")
    why = [] if ok else [f"raised at {where}, not a deliberate worded error"]
    if not kept:
        why.append("weights/state changed before the error")
    return out("CRASH", f"{when}{fmt(exc)} ({'; '.join(why)})")


# ============================================================================ A: Python API
@case("A42", "SILENT", ("GrassWalk",))
def a42(ctx, cls):
    W, b = params_wb()
    try:
        opt = make(cls, [W, b], walk_angle=True)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "constructor: ")
    return out("SILENT", f"constructed; walk_angle={opt.param_groups[0]['walk_angle']!r} "
                         "(a bool taken as 1 rad)")


@case("A56", "SILENT", ("ROOT",))
def a56(ctx, cls):
    W, b = params_wb()
    try:
        opt = make(cls, [W, b], coefficients=[(float("nan"), 0.0, 0.0)])
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "constructor: ")
    try:
        train(opt, [W, b], 3)
    except Exception as e:  # noqa: BLE001
        return out("CRASH", f"accepted, then step() raised {fmt(e)}")
    if not finite([W]):
        return out("SILENT", "NaN Newton-Schulz coefficients accepted: weights NaN after 3 steps")
    return out("OK", "accepted, weights finite after 3 steps")


@case("A68", "SILENT", ALL8)
def a68(ctx, cls):
    import torch
    W, b = params_wb()
    W2, b2 = [torch.nn.Parameter(p.detach().clone()) for p in (W, b)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = make(cls, [W, W, b])
        except Exception as e:  # noqa: BLE001
            return error_outcome(e, None, None, None, "constructor: ")
    ref = make(cls, [W2, b2])
    set_grads([W, b], 0)
    set_grads([W2, b2], 0)
    opt.step()
    ref.step()
    steps = opt.state[W].get("step") if W in opt.state else None
    equal = torch.equal(W, W2)
    warned = [str(w.message)[:60] for w in caught]
    if equal:
        return out("OK", f"listed twice, stepped once (step {steps}); warnings: {len(warned)}")
    return out("SILENT", f"a parameter listed twice is stepped twice per step() (step count "
                         f"{steps}, differs from single listing); only warning: "
                         f"{warned[0] if warned else 'none'}")


def _ls_problem(dtype, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 16, generator=g)
    X[:, 0] = 0.0  # one input feature always zero (padding): zero gradient entries
    Wt = torch.randn(16, 32, generator=g)
    Y = X @ Wt + 0.1 * torch.randn(64, 32, generator=g)
    W = torch.nn.Parameter((0.1 * torch.randn(16, 32, generator=g)).to(dtype))
    b = torch.nn.Parameter(torch.zeros(32).to(dtype))
    return X.to(dtype), Y.to(dtype), W, b


def _ls_run(cls, dtype, steps=30, lr=1e-2):
    X, Y, W, b = _ls_problem(dtype)
    opt = make(cls, [W, b], lr=lr)
    losses = []
    for _ in range(steps + 1):
        opt.zero_grad()
        loss = ((X @ W + b - Y) ** 2).mean()
        losses.append(float(loss.detach().float()))
        if len(losses) > steps:
            break
        loss.backward()
        opt.step()
    return losses[0], losses[-1], finite([W, b])


def _dtype_case(ctx, cls):
    import torch
    f0, f32, _ = _ls_run(cls, torch.float32)
    try:
        first, last, fin = _ls_run(cls, torch.float16)
    except Exception as e:  # noqa: BLE001
        ok, _ = clear_error(e)
        return out("CLEAN" if ok else "CRASH", f"float16: {fmt(e)}")
    tol = 0.1 * abs(f0 - f32) + 0.02 * abs(f32)
    summary = f"loss {first:.3f} -> fp16 {last:.3f} vs fp32 {f32:.3f} after 30 steps"
    if fin and math.isfinite(last) and abs(last - f32) <= tol:
        return out("OK", summary)
    return out("SILENT", summary + ("" if fin else ", weights non-finite")
               + " (torch AdamW: NaN on this problem too)")


for _cid, _cls in (("A72", "GrassWalk"), ("A80", "GrassJump"), ("A83", "SARA"), ("A86", "GaLore"),
                   ("A89", "SNSM"), ("A92", "SubspaceMomentum")):
    case(_cid, "SILENT", (_cls,))(_dtype_case)


@case("A104", "CRASH", ("ROOT",))
def a104(ctx, cls):
    import torch
    W = torch.nn.Parameter(torch.zeros(0, 8))
    try:
        opt = make(cls, [W])
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "constructor: ")
    W.grad = torch.zeros(0, 8)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "step(): ")
    return out("OK", "zero-size parameter stepped")


def _add_group_aftermath(ctx, cls):
    """add_param_group with lr=-1 must be refused and leave the optimizer as it was: same
    groups, step() works, the parameter can be added again with a valid lr."""
    import torch
    W, V = params_wb(shapes=((16, 32), (16, 32)))
    opt = make(cls, [W])
    train(opt, [W], 1)
    before = snapshot(opt, [W])
    try:
        opt.add_param_group({"params": [V], "lr": -1.0})
    except Exception as e:  # noqa: BLE001
        err = e
    else:
        return out("SILENT", f"a group with lr=-1 was accepted: lrs {[g['lr'] for g in opt.param_groups]}")
    ok, where = clear_error(err)
    kept = unchanged(before, opt, [W])
    n_groups = len(opt.param_groups)
    problems = []
    if not ok:
        problems.append(f"raised at {where}")
    if not kept:
        problems.append(f"the rejected group stays ({n_groups} groups, lrs "
                        f"{[g['lr'] for g in opt.param_groups]})")
    W.grad = torch.randn(16, 32)
    try:
        opt.step()
        step_plain = "ok"
    except Exception as e:  # noqa: BLE001
        step_plain = fmt(e)
        problems.append(f"step() then raises {shorten(fmt(e), 90)}")
    W.grad, V.grad = torch.randn(16, 32), torch.randn(16, 32)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        if step_plain == "ok":
            problems.append(f"step() with a gradient on V raises {shorten(fmt(e), 90)}")
    try:
        opt.add_param_group({"params": [V], "lr": 1e-2})
    except Exception as e:  # noqa: BLE001
        problems.append(f"re-adding V with lr=0.01 refused ({shorten(fmt(e), 60)})")
    if not problems:
        return out("CLEAN", f"rejected ({fmt(err)}); optimizer unchanged and usable, V re-added")
    return out("CRASH", f"rejected ({shorten(str(err), 50)}), but " + "; ".join(problems))


@case("A106", "CRASH", ALL8)
def a106(ctx, cls):
    return _add_group_aftermath(ctx, cls)


@case("A109", "CRASH", ("GrassWalk",))
def a109(ctx, cls):
    return _add_group_aftermath(ctx, cls)


def _options_of(opt):
    """The class's own options in group 0 (what a foreign state must not change)."""
    keys = set(getattr(type(opt), "option_defaults", {}) or {})
    keys |= {"rank", "update_interval"} & set(opt.param_groups[0])
    return {k: opt.param_groups[0].get(k) for k in sorted(keys)}


def trained_source(cls):
    """A ``cls`` optimizer over a fresh 16x32 matrix and 32-vector, trained 2 steps: the source
    of the load_state_dict cases."""
    src_p = params_wb()
    src = make(cls, src_p)
    train(src, src_p, 2)
    return src


def _load_case(src_opt, dst_opt, dst_params, sd=None, check=None, steps_after=1):
    """Load ``sd`` (default: ``src_opt``'s state) into ``dst_opt`` (stepped once), then step:
    CLEAN for a clear refusal with nothing changed, CRASH for an unclear error or one at the
    next step, SILENT/OK from ``check(dst_opt, options_before)`` or finiteness."""
    train(dst_opt, dst_params, 1, seed=50)
    options = _options_of(dst_opt) if hasattr(type(dst_opt), "option_defaults") else {}
    sd = src_opt.state_dict() if sd is None else sd
    before = snapshot(dst_opt, dst_params)
    try:
        dst_opt.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, before, dst_opt, dst_params, "at load: ")
    try:
        train(dst_opt, dst_params, steps_after, seed=60)
    except Exception as e:  # noqa: BLE001
        return out("CRASH", f"loaded, then step() raised {fmt(e)}")
    if check is not None:
        verdict = check(dst_opt, options)
        if verdict is not None:
            return verdict
    if options:
        now = _options_of(dst_opt)
        changed = {k: (options[k], now.get(k)) for k in options if not same(options[k], now.get(k))}
        if changed:
            return out("SILENT", "loaded and stepped; the optimizer's options changed: "
                       + ", ".join(f"{k} {a!r}->{b!r}" for k, (a, b) in changed.items()))
    if not finite(dst_params):
        return out("SILENT", "loaded and stepped: weights non-finite")
    return out("OK", "loaded and stepped; weights finite, options kept")


@case("A110", "CRASH", ALL8)
def a110(ctx, cls):
    src = trained_source(cls)
    dst_p = params_wb(1, ((16, 48), (48,)))
    return _load_case(src, make(cls, dst_p), dst_p)


@case("A111", "CRASH", ALL8)
def a111(ctx, cls):
    src_p = params_wb(0, ((16, 48), (48,)))
    src = make(cls, src_p)
    train(src, src_p, 2)
    dst_p = params_wb(1)
    return _load_case(src, make(cls, dst_p), dst_p)


def _swapped(ctx, cls):
    src = trained_source(cls)
    W, b = params_wb(1)
    return _load_case(src, make(cls, [b, W]), [b, W])


for _cid, _classes in (("A112", ("GrassWalk", "GrassJump", "SARA", "GaLore")),
                       ("A121", ("SNSM", "SubspaceMomentum")), ("A122", ("SubsetNorm",)),
                       ("A124", ("ROOT",))):
    case(_cid, "CRASH", _classes)(_swapped)


@case("A113", "SILENT", ALL8)
def a113(ctx, cls):
    src = trained_source(cls)
    sd = src.state_dict()
    sd["param_groups"][0]["lr"] = float("nan")
    dst_p = params_wb(1)

    def check(opt, _):
        lr = opt.param_groups[0]["lr"]
        if isinstance(lr, float) and math.isnan(lr):
            return out("SILENT", f"lr=NaN accepted on load; weights finite: {finite(dst_p)}")
        return None
    return _load_case(src, make(cls, dst_p), dst_p, sd, check)


def _rank0(ctx, cls):
    src = trained_source(cls)
    sd = src.state_dict()
    sd["param_groups"][0]["rank"] = 0
    dst_p = params_wb(1)

    def check(opt, _):
        if opt.param_groups[0].get("rank") == 0:
            return out("SILENT", f"rank=0 accepted on load and a step ran (finite: "
                                 f"{finite(dst_p)}); latent failure at the next refresh")
        return None
    return _load_case(src, make(cls, dst_p), dst_p, sd, check)


case("A114", "SILENT", ("GrassWalk", "SARA", "GaLore", "SNSM", "SubspaceMomentum"))(_rank0)
case("A120", "CRASH", ("GrassJump",))(_rank0)


@case("A117", "CRASH", ALL8)
def a117(ctx, cls):
    src = trained_source(cls)
    plain = src.state_dict()
    bridge = {"slimopt_zero": 1, "world_size": 1,
              "state": {str(k): v for k, v in plain["state"].items()},
              "param_groups": [{k: v for k, v in g.items() if k != "params"}
                               for g in plain["param_groups"]]}
    dst_p = params_wb(1)
    return _load_case(src, make(cls, dst_p), dst_p, bridge)


def _adamw_state(ctx, cls):
    src = trained_source("AdamW")
    dst_p = params_wb(1)
    return _load_case(src, make(cls, dst_p), dst_p)


case("A118", "CRASH", RANKED)(_adamw_state)
case("A123", "CRASH", ("SubsetNorm", "ROOT"))(_adamw_state)


def _cross(src_cls, dst_cls):
    def run_case(ctx, cls):
        src = trained_source(src_cls)
        dst_p = params_wb(1)
        return _load_case(src, make(dst_cls, dst_p), dst_p)
    return run_case


for _cid, _rv, _s, _d in (("A125", "SILENT", "GaLore", "GrassJump"),
                          ("A126", "CRASH", "GrassJump", "GaLore"),
                          ("A127", "CRASH", "SNSM", "GrassWalk"),
                          ("A128", "CRASH", "GrassWalk", "SNSM"),
                          ("A129", "CRASH", "ROOT", "GrassWalk"),
                          ("A130", "CRASH", "GrassWalk", "ROOT"),
                          ("A131", "CRASH", "SubsetNorm", "SNSM"),
                          ("A133", "CRASH", "GrassWalk", "AdamW")):
    case(_cid, _rv, (f"{_s}->{_d}",))(_cross(_s, _d))


@case("A150", "SILENT", ("GaLore->GrassJump",))
def a150(ctx, cls):
    src = trained_source("GaLore")
    dst_p = params_wb(1)
    dst = make("GrassJump", dst_p)
    before = {k: dst.param_groups[0].get(k) for k in ("moment_rule", "recovery")}
    try:
        dst.load_state_dict(src.state_dict())
    except Exception as e:  # noqa: BLE001
        ok, _ = clear_error(e)
        kept = {k: dst.param_groups[0].get(k) for k in before} == before and not dst.state
        return out("CLEAN" if ok and kept else "CRASH", f"at load: {fmt(e)}")
    after = {k: dst.param_groups[0].get(k) for k in before}
    if after != before:
        return out("SILENT", f"GrassJump's options {before} became {after} (GaLore's)")
    return out("OK", f"loaded; GrassJump keeps {after}")


def _lora_model(seed=0, dtype=None):
    import torch
    torch.manual_seed(seed)

    class M(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.q_proj = torch.nn.Linear(16, 16)
            s.v_proj = torch.nn.Linear(16, 4)

        def forward(s, x):
            return s.v_proj(torch.relu(s.q_proj(x)))
    m = M()
    if dtype is not None:
        m = m.to(dtype)
    from slimopt.lora import apply_lora
    return apply_lora(m, rank=4, alpha=8)


def _lora_params(m):
    return {n: p for n, p in m.named_parameters() if p.requires_grad}


@case("A142", "SILENT")
def a142(ctx, cls):
    m = _lora_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt = slim().AdaPreLoRA(m, lr=1e-3, lora_scale=0)
        except Exception as e:  # noqa: BLE001
            return error_outcome(e, None, None, None, "constructor: ")
    scales = [g.get("lora_scale") for g in opt.param_groups if not g.get("dense")]
    said = [str(w.message) for w in caught if "lora_scale" in str(w.message)]
    if said:
        return out("OK", f"constructed with a warning: {shorten(said[0], 80)}")
    return out("SILENT", f"lora_scale=0 accepted and ignored (pair groups use {scales})")


@case("A148", "CRASH")
def a148(ctx, cls):
    import torch
    try:
        m = _lora_model(dtype=torch.float16)
        opt = slim().AdaPreLoRA(m, lr=1e-3)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "set-up: ")
    params = list(_lora_params(m).values())
    g = torch.Generator().manual_seed(0)
    for i in range(10):
        x = torch.randn(8, 16, generator=g).half()
        opt.zero_grad()
        try:
            m(x).float().pow(2).mean().backward()
            before = snapshot(opt, params) if i == 0 else None
            opt.step()
        except Exception as e:  # noqa: BLE001
            if i == 0:
                return error_outcome(e, before, opt, params, "first step(): ")
            return out("CRASH", f"step {i}: {fmt(e)}")
    if finite(params):
        return out("OK", "float16 LoRA model: 10 steps, finite")
    return out("SILENT", "float16 LoRA model: non-finite factors after 10 steps")


@case("A149", "SILENT")
def a149(ctx, cls):
    import torch
    m = _lora_model()
    lp = _lora_params(m)
    opt = slim().AdaPreLoRA(m, lr=1e-3)
    A, B = lp["q_proj.lora_A.weight"], lp["q_proj.lora_B.weight"]
    for p in lp.values():
        p.grad = None
    B.grad = torch.randn_like(B)
    before = snapshot(opt, list(lp.values()))
    skips0 = opt.nonfinite_skips()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            opt.step()
        except Exception as e:  # noqa: BLE001
            return error_outcome(e, before, opt, list(lp.values()), "step(): ")
    moved = not torch.equal(B.detach(), before["weights"][list(lp).index(
        "q_proj.lora_B.weight")])
    if moved:
        return out("OK", "pair with only B's gradient: B stepped")
    said = [str(w.message) for w in caught]
    counted = opt.nonfinite_skips() != skips0 or any(
        isinstance(v, int) and v > 0 and "skip" in k for s in opt.state.values()
        for k, v in s.items() if k != "nonfinite_skips")
    if said or counted:
        return out("OK", f"pair skipped and reported ({shorten(said[0], 60) if said else 'counted'})")
    return out("SILENT", "pair with only B's gradient silently not stepped, nothing counted")


@case("A151", "CRASH")
def a151(ctx, cls):
    import torch
    W, b = params_wb()
    opt = make("GrassWalk", [W, b])
    train(opt, [W, b], 1)
    try:
        basis = opt.current_basis(torch.randn(16, 32))
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "current_basis(foreign tensor): ")
    if basis is None:
        return out("OK", "current_basis(foreign tensor) returned None")
    return out("SILENT", f"current_basis(foreign tensor) returned a {type(basis).__name__}")


@case("A152", "SILENT")
def a152(ctx, cls):
    import torch
    W, b = params_wb()
    opt = make("GrassWalk", [W, b], lr=0.05)
    train(opt, [W, b], 1)
    before = snapshot(opt, [W, b])
    try:
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: -1.0)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, before, opt, [W, b], "LambdaLR: ")
    lr = opt.param_groups[0]["lr"]
    set_grads([W, b], 7)
    before = snapshot(opt, [W, b])
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, before, opt, [W, b], f"group lr {lr}; step(): ")
    if isinstance(lr, (int, float)) and lr < 0:
        return out("SILENT", f"scheduler set lr {lr}; step() applied it without error")
    return out("OK", f"group lr after the scheduler: {lr}")


@case("A160", "CRASH")
def a160(ctx, cls):
    import torch
    W = torch.nn.Parameter(torch.empty(16, 32, device="meta"))
    opt = make("GrassWalk", [W])
    W.grad = torch.empty(16, 32, device="meta")
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "step() on meta: ")
    return out("OK", "step() on meta parameters ran (shape-only)")


@case("A165", "CRASH", ALL8)
def a165(ctx, cls):
    import torch
    W1, W2, b = params_wb(0, ((16, 32), (16, 32), (32,)))
    ps = [W1, W2, b]
    opt = make(cls, ps, nonfinite="raise")
    train(opt, ps, 1)
    set_grads(ps, 5)
    b.grad = torch.full((32,), float("nan"))
    before = snapshot(opt, ps)
    try:
        opt.step()
    except FloatingPointError as e:
        if unchanged(before, opt, ps):
            return out("CLEAN", f"FloatingPointError before any update: {shorten(e, 80)}")
        moved = [not torch.equal(p, w) for p, w in zip(ps, before["weights"])]
        steps = [opt.state[p].get("step") for p in ps]
        return out("CRASH", f"FloatingPointError after a partial step: params modified "
                            f"{moved}, steps {steps}")
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, before, opt, ps, "step(): ")
    return out("SILENT", "nonfinite='raise' did not raise on a NaN gradient")


def _lora_run(zero_at_0=None, steps=10):
    import torch
    m = _lora_model()
    lp = _lora_params(m)
    opt = slim().AdaPreLoRA(m, lr=1e-3)
    g = torch.Generator().manual_seed(3)
    for i in range(steps):
        opt.zero_grad()
        m(torch.randn(8, 16, generator=g)).pow(2).mean().add(1.0).backward()
        if i == 0 and zero_at_0 is not None:
            for p in lp.values():
                p.grad.mul_(zero_at_0)
        opt.step()
    bad = [n for n, p in lp.items() if not bool(p.isfinite().all())]
    return bad, opt.nonfinite_skips()


def _lora_grad_case(factor, label):
    def run_case(ctx, cls):
        try:
            bad, skips = _lora_run(factor)
        except Exception as e:  # noqa: BLE001
            return out("CRASH", f"{label}: {fmt(e)}")
        if bad:
            return out("SILENT", f"finite {label} gradient at step 0 -> non-finite {bad}; "
                                 f"{skips} later updates skipped")
        return out("OK", f"{label} gradient at step 0: all factors finite after 10 steps "
                         f"(skips {skips})")
    return run_case


case("A179", "SILENT")(_lora_grad_case(0.0, "all-zero"))
case("A183", "SILENT")(_lora_grad_case(1e-30, "1e-30-scaled"))


@case("A193", "SILENT")
def a193(ctx, cls):
    import torch
    try:
        from slimopt.optimizers.core.lora_preconditioner import adafactor_weights
    except ImportError as e:
        return out("SKIP", f"adafactor_weights not importable: {e}")
    try:
        p, q = adafactor_weights(torch.zeros(8), torch.zeros(16), 1e-30)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, None, None, None, "adafactor_weights(zeros, eps1=1e-30): ")
    pmin, qmin = float(p.min()), float(q.min())
    if qmin > 0 and pmin > 0 and bool(p.isfinite().all() and q.isfinite().all()):
        return out("OK", f"zero statistics floored: p_min {pmin:.3g}, q_min {qmin:.3g}")
    return out("SILENT", f"zero statistics: p_min {pmin:.3g}, q_min {qmin:.3g} "
                         "(eps1^2 = 1e-60 is 0 in float32): a later grad/q is 0/0")


@case("A194", "SILENT")
def a194(ctx, cls):
    import torch
    g = torch.Generator().manual_seed(0)
    A = torch.nn.Parameter(0.1 * torch.randn(4, 16, generator=g))
    B = torch.nn.Parameter(0.1 * torch.randn(8, 4, generator=g))
    opt = slim().AdaPreLoRA([{"params": [A, B], "lora_scale": 2.0}], lr=1e-3)
    A.grad, B.grad = torch.zeros_like(A), torch.zeros_like(B)
    try:
        opt.step()
    except Exception as e:  # noqa: BLE001
        return out("CRASH", f"zero gradients on a pair: {fmt(e)}")
    fa, fb = finite([A]), finite([B])
    if fa and fb:
        return out("OK", f"first step with zero gradients on A and B: finite (skips "
                         f"{opt.nonfinite_skips()})")
    return out("SILENT", f"first step with zero gradients: A finite {fa}, B finite {fb}, "
                         f"skips {opt.nonfinite_skips()}")


@case("A198", "SILENT")
def a198(ctx, cls):
    import torch
    torch.manual_seed(0)
    m = _lora_model()
    opt = slim().AdaPreLoRA(m, lr=1e-3)
    history = []
    try:
        for x in (torch.zeros(8, 16), torch.randn(8, 16), torch.randn(8, 16)):
            opt.zero_grad()
            m(x).pow(2).mean().add(1.0).backward()
            opt.step()
            history.append([n for n, p in _lora_params(m).items() if not bool(p.isfinite().all())])
    except Exception as e:  # noqa: BLE001
        return out("CRASH", f"{fmt(e)}")
    if history[-1]:
        return out("SILENT", f"first batch of zeros -> non-finite {history[-1]} for good "
                             f"(skips {opt.nonfinite_skips()})")
    return out("OK", f"first batch of zeros: factors finite after 3 steps (skips "
                     f"{opt.nonfinite_skips()})")


def _tiny_llama():
    import torch
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=8)
    return transformers.LlamaForCausalLM(config)


def _build_params(value):
    def run_case(ctx, cls):
        from slimopt.launch.zero import build_from_config
        model = _tiny_llama()
        try:
            opt = build_from_config({"type": "slimopt.GrassWalk", "params": value}, model)
        except Exception as e:  # noqa: BLE001
            return error_outcome(e, None, None, None, f"params={value!r}: ")
        if value is None:
            return out("OK", f"params=None taken as no options: {type(opt).__name__}")
        return out("SILENT", f"params={value!r} accepted: {type(opt).__name__}")
    return run_case


case("A216", "CRASH")(_build_params([1, 2]))
case("A217", "CRASH")(_build_params("abc"))
case("A218", "CRASH")(_build_params(None))


@case("A233", "SILENT", isolated=True)
def a233(ctx, cls):
    """World-1 ZeRO-2 engine; the client optimizer is handed (a) half its own state labelled
    world_size 2 (standing in for rank 0's share of a 2-rank state) and (b) its state with one
    tensor of the wrong shape."""
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    from slimopt.launch import initialize
    model = _tiny_llama()
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 9,
           "optimizer": {"type": "slimopt.GrassWalk",
                         "params": {"lr": 1e-2, "rank": 4, "update_interval": 2}}}
    with contextlib.redirect_stdout(sys.stderr):
        engine, _, _, _ = initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    client = engine.optimizer.optimizer
    full = client.state_dict()
    keys = sorted(full["state"], key=int)
    share = copy.deepcopy(full)
    share["world_size"] = 2
    share["state"] = {k: v for i, (k, v) in enumerate(sorted(full["state"].items(),
                                                            key=lambda kv: int(kv[0])))
                      if i % 2 == 0}
    wrong = copy.deepcopy(full)
    k0 = keys[0]
    tname = next(n for n, v in wrong["state"][k0].items() if torch.is_tensor(v) and v.dim() >= 1)
    wrong["state"][k0][tname] = torch.zeros(*[s + 3 for s in wrong["state"][k0][tname].shape])
    results = []
    for label, sd in (("half the state, world_size 2", share), ("a wrong-shaped tensor", wrong)):
        before = clone_tree(client.state_dict())
        weights = [p.detach().clone() for p in engine.module.parameters()]
        try:
            client.load_state_dict(sd)
        except Exception as e:  # noqa: BLE001
            ok, where = clear_error(e)
            kept = same(before, clone_tree(client.state_dict())) and all(
                torch.equal(a, p.detach()) for a, p in zip(weights, engine.module.parameters()))
            results.append((label, "CLEAN" if ok and kept else "CRASH", fmt(e)))
            continue
        results.append((label, "SILENT", f"accepted ({len(sd['state'])} of {len(keys)} "
                                         f"matrices, world_size {sd['world_size']})"))
    verdicts = [v for _, v, _ in results]
    worst = "SILENT" if "SILENT" in verdicts else ("CRASH" if "CRASH" in verdicts else "CLEAN")
    return out(worst, "; ".join(f"{label}: {shorten(obs, 90)}" for label, _, obs in results)
               + " (the share is cut from a world-1 engine's state)")


@case("A236", "CRASH")
def a236(ctx, cls):
    """An optimizer state file overwritten with random bytes, read back with the checkout's own
    checkpoint reader (``slimopt.launch.safe_load.load_file``) where it has one, else with
    ``torch.load`` (what a user of 81389d0 had, and what the review used), then loaded."""
    import torch
    try:
        from slimopt.launch.safe_load import load_file as reader
        name = "slimopt.launch.safe_load.load_file"
    except ImportError:
        def reader(path):
            return torch.load(path, map_location="cpu")
        name = "torch.load"
    W, b = params_wb()
    opt = make("GrassWalk", [W, b])
    train(opt, [W, b], 2)
    path = ctx.path("A", "opt_state.pt")
    torch.save(opt.state_dict(), path)
    with open(path, "wb") as f:  # seeded random bytes (seed 61: torch 2.13 reads them as a
        f.write(random.Random(61).randbytes(2048))  # legacy pickle and fails inside)
    before = snapshot(opt, [W, b])
    try:
        sd = reader(path)
        opt.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        return error_outcome(e, before, opt, [W, b], f"{name} + load_state_dict: ")
    return out("SILENT", "random bytes loaded as an optimizer state")


# ============================================================================ SR: security
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo code ran > {shlex.quote(self.marker)}",))


@case("SR1", "SILENT")
def sr1(ctx, cls):
    import torch
    marker = ctx.path("SR1", "PWNED")
    crafted = ctx.path("SR1", "crafted.pt")
    torch.save({"slimopt_resharded": 1, "x": _Evil(marker)}, crafted)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from slimopt.launch import load_resharded
            load_resharded(None, crafted)
        err = None
    except Exception as e:  # noqa: BLE001
        err = e
    if os.path.exists(marker):
        return out("SILENT", "the pickled os.system ran (marker file created)"
                   + (f", then {fmt(err)}" if err else ""))
    if err is None:
        return out("SILENT", "crafted file accepted without an engine (no code ran)")
    ok, _ = clear_error(err)
    return out("CLEAN" if ok else "CRASH", f"no code ran; {fmt(err)}")


# ============================================================================ C: slimopt-pretrain
BASE_C = ["--steps", "3", "--eval-every", "3"]


def _lrs_from(outdir):
    """Group-0 lr saved in each checkpoint-N.pt (the lr of the step after N) and initial_lr."""
    found = {}
    for p in glob.glob(os.path.join(outdir, "checkpoint-*.pt")):
        m = re.search(r"checkpoint-(\d+)\.pt$", p)
        if not m:
            continue
        g = group0(torch_load(p))
        found[int(m.group(1))] = (g.get("lr"), g.get("initial_lr"))
    return dict(sorted(found.items()))


def _min_lr_case(ratio, steps, every):
    def run_case(ctx, cls):
        o = ctx.dir("C", f"minlr_{ratio}")
        p = pretrain(ctx, *BASE_C, "--min-lr-ratio", ratio, "--steps", steps, "--warmup", 2,
                     "--eval-every", every, "--save-every", every, "--output-dir", o)
        refused = verdict_for_refusal(p)
        if refused:
            return refused
        lrs = _lrs_from(o)
        peak = next((i for _, i in lrs.values() if i), None)
        bad = {s: lr for s, (lr, _) in lrs.items()
               if lr is None or not math.isfinite(lr) or lr < 0 or (peak and lr > peak * 1.0001)}
        evals = re.findall(r"eval loss ([\w.+-]+)", p.out)
        trail = f"; eval loss {evals[0]} -> {evals[-1]}" if evals else ""
        if bad:
            return out("SILENT", f"rc 0, schedule lr after steps {dict(bad)} (peak {peak})"
                       + trail)
        return out("OK", f"rc 0, every scheduled lr in [0, peak {peak}]: {lrs}{trail}")
    return run_case


case("C22", "SILENT")(_min_lr_case(-5, 20, 5))
case("C23", "SILENT")(_min_lr_case("nan", 6, 3))
case("C24", "SILENT")(_min_lr_case(50, 20, 5))


@case("C25", "SILENT")
def c25(ctx, cls):
    import torch
    a, b = ctx.dir("C", "clip_nan"), ctx.dir("C", "clip_0")
    p = pretrain(ctx, *BASE_C, "--grad-clip", "nan", "--steps", 6, "--output-dir", a)
    refused = verdict_for_refusal(p)
    if refused:
        return refused
    q = pretrain(ctx, *BASE_C, "--grad-clip", 0, "--steps", 6, "--output-dir", b)
    if q.rc != 0:
        return out("ERROR", f"control run --grad-clip 0 failed: {last_line(q.err)}")
    wa = model_state(torch_load(os.path.join(a, "checkpoint-6.pt")))
    wb = model_state(torch_load(os.path.join(b, "checkpoint-6.pt")))
    if not all(bool(v.isfinite().all()) for v in wa.values() if torch.is_floating_point(v)):
        return out("SILENT", "rc 0, --grad-clip nan accepted: non-finite weights")
    if all(torch.equal(wa[k], wb[k]) for k in wa):
        return out("SILENT", "rc 0, --grad-clip nan accepted: weights equal to the --grad-clip 0 "
                             "run (clipping silently off)")
    return out("OK", "rc 0, --grad-clip nan run differs from --grad-clip 0 (clipping applied)")


def _must_refuse(name, *args):
    """A bad input the CLI must refuse with a one-line error (rc 0 and a run counts as OK)."""
    def run_case(ctx, cls):
        o = ctx.dir("C", name)
        p = pretrain(ctx, *BASE_C, *[a(ctx) if callable(a) else a for a in args],
                     "--output-dir", o)
        refused = verdict_for_refusal(p)
        if refused:
            return refused
        return out("OK", f"rc 0: ran ({last_line(p.out)[:80]})")
    return run_case


case("C28", "CRASH")(_must_refuse("threads", "--threads", "-1"))


def _data_file(name, content):
    def make_file(ctx):
        path = ctx.path("C", "data", name)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as f:
            f.write(content)
        return path
    return make_file


_BAD_JSONL = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(50))
_BAD_JSONL += '{"text": "unterminated\n{not json at all}\n'
for _cid, _name, _content in (
        ("C41", "empty.txt", ""),
        ("C42", "binary.txt", random.Random(42).randbytes(200_000)),
        ("C43", "latin1.txt", "".join(f"caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00e0 la ligne {i}\n"
                                      for i in range(5000)).encode("latin-1")),
        ("C44", "nul.txt", b"\x00" * 100_000),  # a preallocated file: NULs only
        ("C48", "bad.jsonl", _BAD_JSONL)):
    case(_cid, "CRASH")(_must_refuse(_cid, "--data", _data_file(_name, _content)))


@case("C47", "SILENT")
def c47(ctx, cls):
    folder = ctx.dir("C", "mixed")
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("\n".join(f"plain text line {i} " * 20 for i in range(2000)))
    with open(os.path.join(folder, "b.jsonl"), "w") as f:
        f.write("\n".join(json.dumps({"text": f"json doc {i} " * 20}) for i in range(2000)))
    p = pretrain(ctx, *BASE_C, "--data", folder, "--output-dir", ctx.dir("C", "mixed_out"))
    refused = verdict_for_refusal(p)
    if refused:
        return refused
    try:
        from slimopt.launch.data import open_corpus
        docs = list(open_corpus(folder).documents())
    except Exception as e:  # noqa: BLE001
        return out("ERROR", f"rc 0; load_documents({folder!r}) for the check failed: {fmt(e)}")
    raw = [d for d in docs if d.lstrip().startswith('{"text"')]
    if raw:
        return out("SILENT", f"rc 0: {len(raw)} of {len(docs)} documents are raw JSON lines "
                             f"(e.g. {raw[0][:30]!r})")
    return out("OK", f"rc 0: {len(docs)} documents, none raw JSON")


def _loss_case(target, *extra, steps=3):
    """An unusable --output-dir: CLEAN if refused before training, LOSS if trained steps were
    thrown away, CRASH for a traceback before training."""
    def run_case(ctx, cls):
        o = target(ctx)
        p = pretrain(ctx, "--steps", steps, "--eval-every", 1, "--output-dir", o, *extra)
        trained = steps_trained(p)
        kind, line = cli_error(p)
        if kind == "ok":
            ck = glob.glob(os.path.join(o, "checkpoint-*.pt")) if os.path.isdir(o) else []
            return out("OK" if ck else "SILENT", f"rc 0, checkpoints: {len(ck)}")
        if kind == "hang":
            return out("HANG", line)
        if trained:
            return out("LOSS", shorten(f"{len(trained)} step(s) trained, then "
                                       f"{line if kind != 'clean' else 'rc 2: ' + line}; "
                                       "nothing saved"))
        if kind == "clean":
            return out("CLEAN", shorten(f"before training: rc 2: {line}"))
        return out("CRASH", shorten(f"before training: {line}"))
    return run_case


def _existing_file(name):
    def make_path(ctx):
        path = ctx.path("C", name)
        with open(path, "w") as f:
            f.write("a,b\n1,2\n")
        return path
    return make_path


case("C56", "LOSS")(_loss_case(_existing_file("data.csv"), "--save-every", 10, steps=12))
case("C57", "LOSS")(_loss_case(lambda ctx: "/proc/slimopt-out"))
case("C58", "LOSS")(_loss_case(lambda ctx: "/proc/slimopt-out2", "--save-every", 1))
case("C59", "CRASH")(_must_refuse("cache", "--cache-dir", "/proc/slimopt-cache", "--max-chars", "123457"))


@case("C64", "CRASH")
def c64(ctx, cls):
    o = _existing_file("tb_file.csv")(ctx)
    argv = [a for a in SMALL if a != "--no-tensorboard"]
    p = run(ctx, [sys.executable, "-m", "slimopt.launch.pretrain", *argv, "--cache-dir",
                  ctx.cache, *BASE_C, "--eval-every", 1, "--output-dir", o])
    trained = steps_trained(p)
    kind, line = cli_error(p)
    if kind == "ok":
        return out("SILENT", "rc 0 with an existing file as --output-dir")
    if trained:
        return out("LOSS", shorten(f"{len(trained)} step(s) trained, then {line}"))
    if kind == "clean":
        return out("CLEAN", shorten(f"at start-up: rc 2: {line}"))
    return out("CRASH", shorten(f"at start-up (no work lost): {line}"))


def _ds_config(content):
    def make_file(ctx):
        path = ctx.path("C", f"ds_{abs(hash(json.dumps(content))) % 10 ** 6}.json")
        with open(path, "w") as f:
            json.dump(content, f)
        return path
    return make_file


case("C66", "CRASH")(_must_refuse("C66", "--deepspeed", _ds_config(
    {"zero_optimization": {"stage": 2}, "optimizer": {"type": "slimopt.GrassWalk",
                                                      "params": [1, 2]}})))
case("C68", "CRASH")(_must_refuse("C68", "--deepspeed", _ds_config([1, 2])))


# ============================================================================ R: --resume
def r_source(ctx):
    """Step 10 of a GrassWalk run (lr 3e-3, weight decay 0): R/base/checkpoint-10.pt."""
    def make_it():
        o = ctx.dir("R", "base")
        p = pretrain(ctx, "--steps", 10, "--save-every", 10, "--eval-every", 5, "--output-dir", o)
        ck = os.path.join(o, "checkpoint-10.pt")
        if p.rc != 0 or not os.path.exists(ck):
            raise out("ERROR", f"source run failed: rc {p.rc}: {last_line(p.err)}")
        return ck
    return ctx.fixture("r_source", make_it)


def resume(ctx, name, ckpt, *extra, steps=12):
    o = ctx.dir("R", name)
    return pretrain(ctx, "--steps", steps, "--eval-every", 6, "--resume", ckpt,
                    "--output-dir", o, *extra), o


def _changed_setting(flag, value, key, new):
    def run_case(ctx, cls):
        src = r_source(ctx)
        old = group0(torch_load(src)).get("initial_lr" if key == "lr" else key)
        p, o = resume(ctx, f"changed_{key}", src, flag, value)
        refused = verdict_for_refusal(p)
        if refused:
            return refused
        path = os.path.join(o, "checkpoint-12.pt")
        if not os.path.exists(path):
            return out("ERROR", f"rc 0 but no {path}")
        got = group0(torch_load(path)).get("initial_lr" if key == "lr" else key)
        pattern = {"lr": r"\blr\b|--lr|learning rate", "walk_angle": r"walk.angle|opt.args",
                   "weight_decay": r"weight.decay"}[key]
        said = [l for l in p.text.splitlines() if re.search(pattern, l, re.I)
                and not l.startswith(("data:", "step ", "final", "optimizer state:"))]
        if got is not None and math.isclose(float(got), float(new), rel_tol=1e-9):
            return out("OK", f"{flag} {value} applied ({key} {old} -> {got})"
                       + (f"; said: {shorten(said[0], 70)}" if said else "; not announced"))
        return out("SILENT", f"rc 0, no refusal; {key} stays {got} (checkpoint's), {flag} "
                             f"{value} ignored" + ("" if not said else
                                                   f"; said: {shorten(said[0], 60)}"))
    return run_case


case("R2", "SILENT")(_changed_setting("--lr", "1e-2", "lr", 1e-2))
case("R3", "SILENT")(_changed_setting("--opt-args", '{"walk_angle": 0.1}', "walk_angle", 0.1))
case("R4", "SILENT")(_changed_setting("--weight-decay", "0.1", "weight_decay", 0.1))


@case("R10", "SILENT")
def r10(ctx, cls):
    src = r_source(ctx)
    p, o = resume(ctx, "fewer_steps", src, steps=5)
    refused = verdict_for_refusal(p)
    if refused:
        return refused
    try:
        with open(os.path.join(o, "result.json")) as f:
            res = json.load(f)
    except OSError:
        return out("OK", f"rc 0, no result written: {shorten(last_line(p.text), 80)}")
    if res.get("steps") == 5:
        return out("SILENT", "rc 0, 0 steps run; result.json says steps 5 for the step-10 model")
    return out("OK", f"rc 0; result.json says steps {res.get('steps')}")


def _crafted(ctx, name, edit):
    import torch
    src = r_source(ctx)
    ck = torch_load(src)
    note = edit(ck)
    path = ctx.path("R", "crafted", f"{name}.pt")
    torch.save(ck, path)
    return path, note


def _drop(key):
    def edit(ck):
        def rec(obj, depth=0):
            if isinstance(obj, dict):
                if key in obj:
                    del obj[key]
                    return True
                return any(rec(v, depth + 1) for v in obj.values() if depth < 4)
            return False
        return rec(ck)
    return edit


def _crafted_case(name, edit, describe):
    def run_case(ctx, cls):
        path, _ = _crafted(ctx, name, edit)
        p, o = resume(ctx, f"crafted_{name}", path)
        refused = verdict_for_refusal(p)
        if refused:
            return refused
        return describe(p, o)
    return run_case


case("R18", "CRASH")(_crafted_case("no_args", _drop("args"), lambda p, o: out(
    "SILENT", "rc 0: a checkpoint without 'args' resumed (resume keys unchecked)")))
case("R21", "CRASH")(_crafted_case("no_optimizer", _drop("optimizer"), lambda p, o: out(
    "SILENT", "rc 0: a checkpoint without 'optimizer' resumed (fresh optimizer state)")))


def _set_position(ck):
    def rec(obj, depth=0):
        if isinstance(obj, dict):
            if "data_position" in obj:
                obj["data_position"] = -5
                return True
            return any(rec(v, depth + 1) for v in obj.values() if depth < 4)
        return False
    return rec(ck)


case("R20", "SILENT")(_crafted_case("data_position", _set_position, lambda p, o: out(
    "SILENT", "rc 0: data_position -5 accepted: " + shorten(
        next((l for l in p.out.splitlines() if "resumed" in l), "resumed"), 60))))


@case("R14", "SILENT")
def r14(ctx, cls):
    import torch
    src = r_source(ctx)
    path = ctx.path("R", "crafted", "flipped.pt")
    with open(src, "rb") as f:
        data = bytearray(f.read())
    try:
        big = max(zipfile.ZipFile(src).infolist(), key=lambda i: i.file_size)
        start = big.header_offset + 30 + len(big.filename.encode()) + len(big.extra) \
            + big.file_size // 2
        record = big.filename
    except zipfile.BadZipFile:
        start, record = len(data) // 2, "middle of the file"
    for i in range(start, start + 64):
        data[i] ^= 0x55
    with open(path, "wb") as f:
        f.write(bytes(data))
    crc = None
    with contextlib.suppress(Exception):
        crc = zipfile.ZipFile(path).testzip()
    p, o = resume(ctx, "flipped", path)
    refused = verdict_for_refusal(p)
    if refused:
        return refused
    resumed = next((l for l in p.out.splitlines() if "resumed" in l), "")
    detail = ""
    with contextlib.suppress(Exception):
        a, b = model_state(torch_load(src)), model_state(torch_load(path))
        diff = {k: int((a[k] != b[k]).sum()) for k in a if torch.is_tensor(a[k])
                and a[k].shape == b[k].shape and not torch.equal(a[k], b[k])}
        if diff:
            k = next(iter(diff))
            detail = (f"; {diff[k]} values of {k} corrupted (max "
                      f"{float(b[k].float().abs().nan_to_num(posinf=3e38).max()):.3g})")
    return out("SILENT", f"rc 0, '{resumed}' from a file with 64 flipped bytes in {record} "
                         f"(zip CRC check flags {crc}){detail}")


@case("R23", "SILENT")
def r23(ctx, cls):
    import torch
    src = r_source(ctx)
    marker = ctx.path("R", "crafted", "PWNED")
    ck = torch.load(src, map_location="cpu", weights_only=True)
    ck["x"] = _Evil(marker)
    path = ctx.path("R", "crafted", "evil.pt")
    torch.save(ck, path)
    p, o = resume(ctx, "evil", path)
    if os.path.exists(marker):
        return out("SILENT", f"the pickled os.system ran (marker created); resume rc {p.rc}")
    refused = verdict_for_refusal(p)
    if refused:
        return out(refused.verdict, "no code ran; " + refused.observation)
    return out("OK", "no code ran; rc 0 (the extra entry ignored)")


def _corpus(path, kind):
    if kind == "code":
        docs = ["def f%d(x):\n    return x + %d\n" % (i, i) * 20 for i in range(800)]
    else:
        docs = ["Lorem ipsum dolor sit amet %d, consectetur adipiscing elit, sed do eiusmod "
                "tempor. " % i * 12 for i in range(800)]
    with open(path, "w") as f:
        f.write("\n".join(json.dumps({"text": d}) for d in docs))


def _changed_data(name, *extra):
    def run_case(ctx, cls):
        data = ctx.path("R", name, "c.jsonl")
        o = ctx.dir("R", name, "out")
        common = ["--preset", "tiny", "--max-chars", "400000", "--no-progress",
                  "--no-tensorboard", "--threads", "1", "--eval-batches", "1", "--cache-dir",
                  ctx.cache, "--output-dir", o, "--data", data, "--eval-every", "5", *extra]
        _corpus(data, "code")
        first = pretrain(ctx, *common, "--steps", 3, "--save-every", 3, small=False)
        if first.rc != 0:
            return out("ERROR", f"first run failed: {last_line(first.err)}")
        time.sleep(1.1)  # a different mtime second, as an edit would have
        _corpus(data, "lorem")
        p = pretrain(ctx, *common, "--steps", 6, "--resume", "auto", small=False)
        refused = verdict_for_refusal(p)
        if refused:
            return refused
        vocab = re.findall(r"vocab ([\d,]+)", first.out + " | " + p.out)
        return out("SILENT", f"rc 0: resumed after --data changed (same path), onto a newly "
                             f"trained tokenizer (vocab {' -> '.join(vocab)}); no warning")
    return run_case


case("R24", "CRASH")(_changed_data("R24"))
case("R25", "SILENT")(_changed_data("R25", "--vocab-size", "300", "--seq-len", "32"))


@case("R26", "CRASH")
def r26(ctx, cls):
    attempts = []
    for attempt in range(2):
        o = ctx.dir("R", f"concurrent{attempt}")
        argv = [sys.executable, "-m", "slimopt.launch.pretrain", *SMALL, "--cache-dir",
                ctx.cache, "--steps", "12", "--save-every", "1", "--eval-every", "6",
                "--output-dir", o]
        procs = [subprocess.Popen(argv, cwd=ctx.scratch, env=ctx.env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True) for _ in range(2)]
        results = []
        for pr in procs:
            try:
                o_, e_ = pr.communicate(timeout=CLI_TIMEOUT)
            except subprocess.TimeoutExpired:
                _kill_group(pr)
                o_, e_ = pr.communicate()
            results.append(Proc(argv, pr.returncode, o_, e_, 0.0))
        step, problem = checkpoint_step(os.path.join(o, "checkpoint-latest.pt"))
        kinds = [cli_error(r) for r in results]
        attempts.append((kinds, step, problem))
        if any(k in ("traceback", "rc", "empty", "hang") for k, _ in kinds) or problem:
            break
        if any(k == "clean" for k, _ in kinds):
            break
    kinds, step, problem = attempts[-1]
    latest = f"checkpoint-latest.pt {'step ' + str(step) if problem is None else problem}"
    bad = [line for k, line in kinds if k in ("traceback", "rc", "empty")]
    if problem is not None and step is None:
        return out("LOSS", f"two runs into one dir: {latest}; " + "; ".join(bad))
    if bad:
        return out("CRASH", shorten(f"two runs into one dir: one died: {bad[0]}; {latest}", 170))
    if any(k == "hang" for k, _ in kinds):
        return out("HANG", "two runs into one dir: one never exited")
    clean = [line for k, line in kinds if k == "clean"]
    if clean:
        return out("CLEAN", shorten(f"second run refused: {clean[0]}; {latest}"))
    return out("OK", f"both runs finished in {len(attempts)} attempt(s) (race not hit or "
                     f"safe); {latest}")


# ============================================================================ K: disk full
FSIZE_LIMIT = 1 << 20  # 1 MiB: below one checkpoint (~6 MB), above result.json


def _ignore_sigxfsz():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limit_now():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def latest_checkpoint(folder):
    """checkpoint-latest.pt, else the highest checkpoint-N.pt, else None."""
    latest = os.path.join(folder, "checkpoint-latest.pt")
    if os.path.exists(latest):
        return latest
    numbered = [(int(m.group(1)), p) for p in glob.glob(os.path.join(folder, "checkpoint-*.pt"))
                if (m := re.search(r"checkpoint-(\d+)\.pt$", p))]
    return max(numbered)[1] if numbered else None


def _disk_full_verdict(p, o, what):
    path = latest_checkpoint(o)
    step, problem = checkpoint_step(path) if path else (None, "no checkpoint left")
    tmps = sorted(f for f in os.listdir(o) if "tmp" in f)
    kind, line = cli_error(p)
    state = (f"{os.path.basename(path) if path else 'checkpoint'} "
             f"{'step ' + str(step) + ' intact' if problem is None else problem}, "
             f"tmp files left: {tmps or 'none'}")
    if problem is not None:
        return out("LOSS", f"{what}; {state}; {line or 'rc 0'}")
    if kind == "ok":
        return out("SILENT", f"{what}; rc 0 although a save hit EFBIG; {state}")
    if kind == "hang":
        return out("HANG", f"{what}: {line}")
    if kind == "clean":
        return out("CLEAN", f"{what}; {state}; rc 2: {line}")
    return out("CRASH", f"{what}; {state}; {line}")


def k9_run(ctx):
    """A fresh run (--save-every 2) whose file-size limit drops to 1 MiB (EFBIG) as soon as its
    first checkpoint is complete: the disk fills up between two saves."""
    def make_it():
        o = ctx.dir("K", "diskfull")
        state = {}

        def watch(proc):
            t0, seen = time.time(), None
            while proc.poll() is None and time.time() - t0 < CLI_TIMEOUT:
                done = os.path.exists(os.path.join(o, "checkpoint-latest.pt"))
                if not done and latest_checkpoint(o) and not any("tmp" in f for f in os.listdir(o)):
                    seen = seen or time.time()  # a layout without checkpoint-latest.pt
                    done = time.time() - seen > 0.05
                if done:
                    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))
                    state["at"] = sorted(os.listdir(o))
                    return
                time.sleep(0.005)
        p = pretrain(ctx, "--steps", 6, "--save-every", 2, "--eval-every", 1, "--output-dir", o,
                     preexec=_ignore_sigxfsz, on_start=watch)
        if "at" not in state:
            raise out("ERROR", f"no checkpoint appeared (rc {p.rc}: {last_line(p.err)})")
        return p, o, state["at"]
    return ctx.fixture("k9", make_it)


@case("K9", "CRASH")
def k9(ctx, cls):
    p, o, at = k9_run(ctx)
    first = [f for f in at if re.match(r"checkpoint-(\d+|latest)\.pt$", f)]
    return _disk_full_verdict(p, o, f"EFBIG (RLIMIT_FSIZE 1 MiB) once {','.join(first)} existed")


@case("K10", "CRASH")
def k10(ctx, cls):
    _, o, _ = k9_run(ctx)
    p = pretrain(ctx, "--steps", 6, "--save-every", 2, "--eval-every", 1, "--output-dir", o,
                 "--resume", "auto", preexec=_limit_now)
    resumed = next((l for l in p.out.splitlines() if "resumed" in l), "not resumed")
    return _disk_full_verdict(p, o, f"--resume auto, size still limited ({resumed})")


# ============================================================================ D: distributed
def d_source(ctx):
    """A 2-rank ZeRO-2 (GrassJump) run's DeepSpeed tag step8: D/src/deepspeed/step8."""
    def make_it():
        cfg = ctx.path("D", "z2.json")
        with open(cfg, "w") as f:
            json.dump({"zero_optimization": {"stage": 2}, "optimizer": {
                "type": "slimopt.GrassJump",
                "params": {"lr": 0.003, "rank": 8, "update_interval": 3}}}, f)
        o = ctx.dir("D", "src")
        p = torchrun(ctx, "--steps", 8, "--save-every", 8, "--eval-every", 4, "--rank", 8,
                     "--update-interval", 3, "--deepspeed", cfg, "--output-dir", o)
        tag = os.path.join(o, "deepspeed", "step8")
        if p.rc != 0 or not os.path.isdir(tag):
            raise out("ERROR", f"2-rank source run failed: rc {p.rc}: {last_line(p.err)}")
        return cfg, o, tag
    return ctx.fixture("d_source", make_it)


def _damaged_copy(ctx, name, damage):
    _, _, tag = d_source(ctx)
    folder = ctx.dir("D", name, "deepspeed")
    dst = os.path.join(folder, "step8")
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tag, dst)
    damage(dst)
    return folder, dst


@case("D15", "CRASH")
def d15(ctx, cls):
    cfg, _, _ = d_source(ctx)

    def drop_model_states(dst):
        for f in glob.glob(os.path.join(dst, "*model_states.pt")):
            os.remove(f)
    _, dst = _damaged_copy(ctx, "D15", drop_model_states)
    p = torchrun(ctx, "--steps", 10, "--eval-every", 4, "--rank", 8, "--update-interval", 3,
                 "--deepspeed", cfg, "--output-dir", ctx.dir("D", "D15", "out"), "--resume", dst)
    if p.timed_out:
        return out("HANG", f"no exit after {p.seconds:.0f} s")
    if p.rc == 0:
        return out("SILENT", "rc 0: resumed from a tag without model states")
    errors = [l for l in significant_stderr(p.err) if l.startswith("slimopt-pretrain: error:")]
    worker_tb = re.search(r'File "[^"]*/slimopt/', p.err) is not None
    if worker_tb:
        return out("CRASH", f"rc {p.rc}: a rank died with a traceback: {exception_line(p.err)}")
    if not errors:
        return out("CRASH", f"rc {p.rc}, no error line: {shorten(last_line(p.err), 100)}")
    if any(_EMPTY_REASON.search(l) for l in errors):
        return out("CRASH", shorten(f"rc {p.rc}, empty reason: {errors[0]}"))
    return out("CLEAN", shorten(f"rc {p.rc}, {len(errors)} rank(s): {errors[0]}"))


def zero_checkpoint(ctx, *args):
    return run(ctx, [sys.executable, "-m", "slimopt.launch.zero_checkpoint", *map(str, args)])


ZC_PROGS = ("python -m slimopt.launch.zero_checkpoint", "zero_checkpoint",
            "slimopt-zero-checkpoint")


@case("D17", "CRASH")
def d17(ctx, cls):
    def truncate_rank1(dst):
        files = sorted(glob.glob(os.path.join(dst, "*_optim_states.pt")))
        victim = next((f for f in files if "rank_1" in os.path.basename(f)), files[-1])
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    folder, _ = _damaged_copy(ctx, "D17", truncate_rank1)
    p = zero_checkpoint(ctx, folder, ctx.path("D", "D17", "merged.pt"), "--tag", "step8")
    v = verdict_for_refusal(p, ZC_PROGS)
    return v or out("SILENT", "rc 0: merged a checkpoint with a truncated rank file")


@case("D20", "CRASH")
def d20(ctx, cls):
    _, o, _ = d_source(ctx)
    target = os.path.join(ctx.scratch, "D", "none", "dir", "out.pt")
    p = zero_checkpoint(ctx, os.path.join(o, "deepspeed"), target, "--tag", "step8")
    v = verdict_for_refusal(p, ZC_PROGS)
    if v:
        return v
    return out("OK" if os.path.exists(target) else "SILENT",
               f"rc 0; output {'written (folder created)' if os.path.exists(target) else 'missing'}")


# ============================================================================ L: slimopt-launch
@case("L6", "CRASH")
def l6(ctx, cls):
    hosts = ctx.path("L", "hosts_dash")
    with open(hosts, "w") as f:
        f.write("--nproc_per_node=64 slots=2\nb slots=2\n")
    p = run(ctx, [sys.executable, "-m", "slimopt.launch.launcher", "--hostfile", hosts,
                  "--dry-run", "--", "--preset", "tiny"])
    v = verdict_for_refusal(p, ("slimopt-launch",))
    if v:
        return v
    from torch.distributed.run import get_args_parser
    commands = [shlex.split(l) for l in p.out.splitlines() if l.strip() and
                not l.lstrip().startswith("#")]
    notes = []
    for argv in commands:
        if "torch.distributed.run" not in argv:
            continue
        rest = argv[argv.index("torch.distributed.run") + 1:]
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser = get_args_parser()
                parser.prog = "torchrun"
                a = parser.parse_args(rest)
        except SystemExit:
            return out("CRASH", shorten(f"dry-run rc 0; torchrun's parser rejects the printed "
                                        f"command: {last_line(err.getvalue())}"))
        notes.append((a.master_addr, a.nproc_per_node))
    if not notes:
        return out("ERROR", f"no torchrun command in the dry-run output: {last_line(p.out)}")
    if all(addr == "--nproc_per_node=64" and str(n) == "2" for addr, n in notes):
        return out("OK", "hostname passed verbatim; torchrun parses every command "
                         "(master_addr '--nproc_per_node=64', nproc 2)")
    return out("SILENT", f"printed commands parse to (master_addr, nproc) {notes}")


L30_SCRIPT = r"""
import base64, contextlib, io, json, linecache, os, subprocess, sys
from deepspeed.launcher.multinode_runner import PDSHRunner
from deepspeed.launcher.runner import parse_args
from slimopt.launch import launcher as L
marker = sys.argv[1]
wanted = ["--opt-args", '{"weight_decay":0}', "--output-dir", "runs/x;touch${IFS}" + marker,
          "--data", "my data $(touch " + marker + ").jsonl"]
err = io.StringIO()
try:
    with contextlib.redirect_stderr(err):
        opts, pre = L.parse_args(["--launcher", "deepspeed", "--hostfile", "hosts", "--", *wanted])
        cmds = L.build_commands(opts, pre, env={})
except SystemExit as e:
    print(json.dumps({"refused": "exit", "code": e.code, "stderr": err.getvalue()}))
    sys.exit(0)
except Exception as e:
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
    print(json.dumps({"refused": "exception", "error": f"{type(e).__name__}: {e}",
                      "deliberate": line.startswith("raise") and bool(str(e).strip())}))
    sys.exit(0)
(_, cmd), = cmds
a = parse_args(cmd[1:])
pdsh, _, _ = PDSHRunner(a, base64.b64encode(b"{}").decode()).get_cmd({}, {"a": [0, 1], "b": [0, 1]})
user = pdsh[pdsh.index(a.user_script) + 1:]
got = subprocess.run(["bash", "-c", "printf '%s\\0' " + " ".join(user)], capture_output=True)
items = got.stdout.decode(errors="replace").split("\0")[:-1]
print(json.dumps({"wanted": wanted, "got": items, "marker": os.path.exists(marker)}))
"""


@case("L30", "SILENT")
def l30(ctx, cls):
    """DeepSpeed 0.19.8's PDSHRunner.get_cmd on the argv slimopt-launch builds for a 2-host
    hostfile; a local ``bash -c`` stands in for the remote shell (no pdsh/ssh here)."""
    folder = ctx.dir("L", "L30")
    with open(os.path.join(folder, "hosts"), "w") as f:
        f.write("a slots=2\nb slots=2\n")
    marker = os.path.join(folder, "INJECTED")
    script = os.path.join(folder, "pdsh_check.py")
    with open(script, "w") as f:
        f.write(L30_SCRIPT)
    p = run(ctx, [sys.executable, script, marker], cwd=folder)
    try:
        res = json.loads(p.out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = None
    if os.path.exists(marker):
        return out("SILENT", "the remote shell ran an injected command (marker created)"
                   + (f"; args arrive as {res['got'][:4]}" if res and "got" in res else ""))
    if res is None:
        return out("ERROR", f"check script rc {p.rc}: {shorten(last_line(p.err), 150)}")
    if res.get("refused") == "exit":
        lines = significant_stderr(res["stderr"])
        if res["code"] == 2 and len(lines) == 1 and lines[0].startswith("slimopt-launch: error:"):
            return out("CLEAN", shorten(f"slimopt-launch refuses: {lines[0]}"))
        return out("CRASH", shorten(f"slimopt-launch exits {res['code']}: {lines}"))
    if res.get("refused") == "exception":
        return out("CLEAN" if res["deliberate"] else "CRASH",
                   shorten(f"build_commands raises {res['error']}"))
    if res["got"] == res["wanted"]:
        return out("OK", "the remote shell receives every argument unchanged; nothing injected")
    return out("SILENT", shorten(f"arguments re-parsed by the remote shell: {res['got'][:4]}"))


# ============================================================================ running
def run_case(ctx, c):
    t0 = time.time()
    try:
        if c.isolated:
            res = run(ctx, [sys.executable, os.path.abspath(__file__), "--repo", ctx.repo,
                            "--_worker", c.id, "--_scratch", ctx.scratch],
                      timeout=API_TIMEOUT * 3)
            if res.timed_out:
                o = out("HANG", f"no result after {res.seconds:.0f} s")
            else:
                try:
                    row = json.loads(res.out.strip().splitlines()[-1])
                    o = out(row["verdict"], row["observation"])
                except (ValueError, IndexError, KeyError):
                    o = out("ERROR", f"worker rc {res.rc}: {shorten(last_line(res.err), 150)}")
        else:
            o = _call(ctx, c)
    except Outcome as raised:
        o = raised
    return o, time.time() - t0


def _call(ctx, c):
    import torch
    torch.manual_seed(0)

    def alarm(signum, frame):
        raise CaseTimeout()
    api = c.family in ("A", "SR")
    if api:
        old = signal.signal(signal.SIGALRM, alarm)
        signal.alarm(API_TIMEOUT)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = c.fn(ctx, c.cls)
        if not isinstance(result, Outcome):
            result = out("ERROR", f"case returned {result!r}")
        return result
    except Outcome as o:
        return o
    except CaseTimeout:
        return out("HANG", f"no result after {API_TIMEOUT} s")
    except Exception as e:  # noqa: BLE001 -- a bug of the replay, reported as such
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return out("ERROR", f"replay failed: {fmt(e)} at {os.path.basename(tb.filename)}:"
                            f"{tb.lineno}")
    finally:
        if api:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def git_rev(repo):
    try:
        rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def import_repo(repo):
    sys.path.insert(0, repo)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
    import slimopt
    where = os.path.realpath(os.path.dirname(slimopt.__file__))
    if not where.startswith(os.path.realpath(repo) + os.sep):
        raise SystemExit(f"replay_reliability: slimopt was imported from {where}, not from {repo}")
    return where


def print_table(rows, counts, review_counts, seconds, repo, rev, stream=sys.stdout):
    w = stream.write
    w(f"\nreliability replay of {repo} ({rev}): {len(rows)} cases in {seconds:.0f} s\n\n")
    w(f"{'verdict':8} {'now':>5} {'review':>7}\n")
    for v in VERDICTS:
        if counts.get(v) or review_counts.get(v):
            w(f"{v:8} {counts.get(v, 0):>5} {review_counts.get(v, 0):>7}\n")
    changed = sum(1 for r in rows if r["verdict"] != r["review"])
    w(f"{'total':8} {len(rows):>5} {len(rows):>7}   ({changed} differ from the review)\n\n")
    w(f"{'id':6} {'class':22} {'verdict':7} {'review':7}   observation\n")
    for r in rows:
        mark = " " if r["verdict"] == r["review"] else "*"
        w(f"{r['id']:6} {r['class']:22} {r['verdict']:7} {r['review']:7} {mark} "
          f"{r['observation']}\n")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="replay_reliability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="slimopt checkout to measure")
    ap.add_argument("--only", help=f"comma-separated families of {','.join(FAMILIES)}, or case ids")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_scratch", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    repo = os.path.realpath(args.repo)
    if not os.path.isdir(os.path.join(repo, "slimopt")):
        ap.error(f"--repo {args.repo}: no slimopt package there")

    if args._worker:  # one isolated case, in this process; prints its outcome as JSON
        os.chdir(args._scratch)
        import_repo(repo)
        ctx = Ctx(repo, args._scratch)
        c = next(c for c in CASES if c.id == args._worker)
        o = _call(ctx, c)
        print(json.dumps({"verdict": o.verdict, "observation": o.observation}))
        return 0

    selected = CASES
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        selected = [c for c in CASES if c.family in wanted or c.id in wanted]
        if not selected:
            ap.error(f"--only {args.only}: no such family or case")
    if args.list:
        for c in selected:
            print(f"{c.id:6} {c.cls:22} review {c.review}")
        print(f"{len(selected)} cases: " + ", ".join(
            f"{v} {n}" for v, n in collections.Counter(c.review for c in selected).items()))
        return 0
    json_out = os.path.abspath(args.json) if args.json else None
    scratch = tempfile.mkdtemp(prefix="replay-reliability-")
    ctx = Ctx(repo, scratch)
    for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_CACHE", "HF_HOME",
                "TOKENIZERS_PARALLELISM", "DS_ACCELERATOR", "MKL_NUM_THREADS"):
        os.environ[key] = ctx.env[key]
    os.chdir(scratch)  # nothing a case does in this process lands in the caller's folder
    import_repo(repo)
    rev = git_rev(repo)
    print(f"replaying {len(selected)} cases against {repo} ({rev}); scratch {scratch}",
          file=sys.stderr)
    t0 = time.time()
    rows = []
    try:
        for i, c in enumerate(selected, 1):
            o, secs = run_case(ctx, c)
            row = {"id": c.id, "class": c.cls, "family": c.family, "verdict": o.verdict,
                   "review": c.review,
                   "observation": shorten(o.observation.replace(scratch, "scratch"), 200),
                   "seconds": round(secs, 2)}
            rows.append(row)
            print(f"[{i}/{len(selected)}] {c.id} {c.cls}: {o.verdict} ({secs:.1f} s) "
                  f"{row['observation'][:110]}", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.time() - t0
    counts = collections.Counter(r["verdict"] for r in rows)
    review_counts = collections.Counter(r["review"] for r in rows)
    print_table(rows, counts, review_counts, seconds, repo, rev)
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"repo": repo, "revision": rev, "seconds": round(seconds, 1),
                       "counts": dict(counts), "review_counts": dict(review_counts),
                       "cases": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
