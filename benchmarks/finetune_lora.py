"""LoRA fine-tuning benchmark: a byte-level LLaMA pretrained on code, fine-tuned on English prose.

Everything is offline and comes with any CPython install, so no weights or data are downloaded:

- **corpus 1** (pretraining): the standard library's own ``.py`` files under
  ``sysconfig.get_paths()["stdlib"]``, sorted by path, skipping ``test``/``tests``/``idle_test``,
  ``site-packages``/``dist-packages``, ``__pycache__`` and ``pydoc_data`` (the latter is corpus 2).
  Every 20th file is held out (the forgetting check).
- **corpus 2** (fine-tuning, a different distribution): the English help text of the interactive
  ``help()`` system, ``pydoc_data.topics.topics`` (the language reference's prose: statements,
  operators, data model, ...), topics sorted by name and joined. It is plain English with
  occasional grammar/code snippets, against corpus 1's code. It is cut into 4 KiB blocks; block
  ``i`` goes to *val* if ``i % 10 == 4`` (learning-rate selection), *test* if ``i % 10 == 9``
  (reported), *train* otherwise. If ``pydoc_data`` is absent (stripped Python builds), the
  stdlib's docstrings (extracted with ``ast``) are used instead, and the JSON says so.

The model is byte-level (vocab 256, no tokenizer): a small ``transformers.LlamaForCausalLM``.

Stage 1 pretrains it from scratch on corpus 1 with ``torch.optim.AdamW``; the checkpoint is cached
under ``--cache-dir`` in a ``.pt`` file whose name hashes the model/pretraining config and the
corpus, so a rerun skips it. Stage 2 fine-tunes, for every method and every learning rate of its
small grid, a fresh copy of the pretrained weights on corpus 2 for ``--steps`` steps, with the
same batches (seeded) and the same LoRA initialization for every run, a linear warmup then a
cosine decay to 10% of the peak, gradient clipping at ``--clip`` (all methods alike):

- ``lora-adamw``: peft LoRA (r=8, alpha=16, all seven projections, dropout 0) + torch AdamW;
- ``loraplus``: ``peft.optimizers.create_loraplus_optimizer`` (AdamW, ``loraplus_lr_ratio=16``);
- ``riemannian``: ``peft.optimizers.create_riemannian_optimizer`` (scaled AdamW, peft's default
  ``reg``); if peft lacks it or it fails, the run is recorded as failed with the error;
- ``adaprelora``: ``slimopt.AdaPreLoRA(peft_model, lr=..., weight_decay=0.0)`` (its defaults:
  momentum on the factor gradients, before the solve);
- ``adaprelora-steps``: the same with ``momentum_on="steps"`` (the EMA of the solved steps, the
  earlier default), a diagnostic row: it spikes early (see the JSON's curves);
- ``adaprelora-beta1=0``: the same with ``beta1=0.0`` (no momentum), a diagnostic row;
- ``adafactor-full``: no LoRA, ``torch.optim.Adafactor`` on every weight (the full-rank ceiling).

The best learning rate of each method is the one with the lowest final loss on corpus 2's *val*
split; the table reports, at that lr and at equal steps, the loss on corpus 2's *test* split and
on corpus 1's held-out files (forgetting), the optimizer-state bytes (``slimopt.state_bytes``) and
the training wall time (steps only, evaluations excluded). Losses are mean cross-entropy in nats
per byte. Writes ``finetune_lora.json``, ``finetune_lora.md`` and (with matplotlib)
``finetune_lora.png`` into ``--out`` (``--name`` changes the stem). ``--seed`` seeds everything
(pretraining, its batches, the LoRA init, the fine-tuning batches) and is part of the checkpoint's
cache key, so a second seed is a second pretrain.

    python benchmarks/finetune_lora.py                       # full run (tens of minutes on 2 CPUs)
    python benchmarks/finetune_lora.py --quick --out /tmp/ft # smoke test, well under a minute
    python benchmarks/finetune_lora.py --methods adaprelora lora-adamw --lrs 1e-3 3e-3
    python benchmarks/finetune_lora.py --seed 1 --name finetune_lora_seed1  # another seed
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, REPO)

import slimopt  # noqa: E402

METHODS = ("lora-adamw", "loraplus", "riemannian", "adaprelora", "adaprelora-steps",
           "adaprelora-beta1=0", "adafactor-full")
#: learning-rate grids, a factor ~3 apart. They are high for LoRA because the model is tiny and the
#: run short; they were placed by a pilot sweep of the full configuration so that each method's
#: best lr is inside its grid. Pilot, final corpus-2 val loss by lr (pretrained model: 2.335):
#:   lora-adamw      3e-4 2.166, 1e-3 2.058, 3e-3 1.915, 1e-2 1.782, 3e-2 2.647
#:   loraplus        1e-4 2.095, 3e-4 1.970, 1e-3 1.815, 3e-3 1.735, 1e-2 2.930
#:   riemannian      3e-4 2.173, 1e-3 2.072, 3e-3 1.951, 1e-2 1.818, 3e-2 1.811, 1e-1 3.132
#:   adaprelora-steps 3e-5 2.201, 1e-4 2.146, 3e-4 2.110, 1e-3 2.137, 3e-3 2.225 (then the default)
#:   adafactor-full  3e-3 2.010, 1e-2 1.860, 3e-2 1.715, 1e-1 1.691, 3e-1 2.546
#: and momentum on the gradients (the review's run, its own pretrain, fidelity review section 5.4):
#:   adaprelora      3e-3 1.847, 1e-2 1.775, 3e-2 2.032
LR_GRIDS = {
    "lora-adamw": (3e-3, 1e-2, 3e-2),
    "loraplus": (1e-3, 3e-3, 1e-2),          # B gets 16x this
    "riemannian": (1e-2, 3e-2, 1e-1),
    "adaprelora": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),  # lr = W-space step RMS (Adafactor-normalized)
    "adaprelora-steps": (1e-4, 3e-4, 1e-3),
    "adaprelora-beta1=0": (1e-3, 3e-3, 1e-2),
    "adafactor-full": (3e-2, 1e-1, 3e-1),    # torch Adafactor's lr is relative (x param RMS)
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "pydoc_data"}
FULL = dict(hidden=128, layers=4, heads=4, intermediate=352, seq=128, batch=16,
            pretrain_steps=400, pretrain_lr=3e-3, steps=200, eval_every=25, val_windows=128,
            eval_cap=512)
QUICK = dict(hidden=32, layers=2, heads=2, intermediate=64, seq=32, batch=4,
             pretrain_steps=15, pretrain_lr=3e-3, steps=6, eval_every=3, val_windows=16,
             eval_cap=32)
BLOCK = 4096


# ---------------------------------------------------------------------------- data
def _stdlib_dir() -> str:
    import sysconfig
    return sysconfig.get_paths()["stdlib"]


def _python_files(root: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def load_corpus1(root: str):
    """(train bytes, held-out bytes, info): stdlib .py files, every 20th file held out."""
    train, held = [], []
    for i, path in enumerate(_python_files(root)):
        with open(path, "rb") as f:
            (held if i % 20 == 0 else train).append(f.read())
    info = dict(source=f"stdlib .py files under {root} (test dirs, site-packages, pydoc_data "
                       "skipped)", files=len(train) + len(held), held_out_files=len(held))
    return b"\n\n".join(train), b"\n\n".join(held), info


def _docstrings(root: str) -> str:
    parts = []
    for path in _python_files(root):
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    parts.append(doc)
    return "\n\n".join(parts)


def load_corpus2(root: str):
    """(train, val, test bytes, info): pydoc's help topics, 4 KiB blocks split 8/1/1."""
    try:
        from pydoc_data.topics import topics
        text = "\n\n".join(topics[k] for k in sorted(topics))
        source = ("pydoc_data.topics.topics: the English help() text of the language reference "
                  f"({len(topics)} topics)")
    except ImportError:
        text = _docstrings(root)
        source = "docstrings of the stdlib .py files (pydoc_data is missing from this Python)"
    data = text.encode("utf-8")
    splits = {"train": [], "val": [], "test": []}
    for i in range(0, len(data), BLOCK):
        k = i // BLOCK
        splits["val" if k % 10 == 4 else "test" if k % 10 == 9 else "train"].append(
            data[i:i + BLOCK])
    out = {k: b"".join(v) for k, v in splits.items()}
    return out["train"], out["val"], out["test"], dict(source=source, bytes=len(data))


def to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def random_starts(n_batches: int, batch: int, length: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, length - seq - 1, (n_batches, batch), generator=g)


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return data[starts.reshape(-1, 1) + torch.arange(seq + 1)]


def eval_windows(data: torch.Tensor, seq: int, cap: int) -> torch.Tensor:
    """Non-overlapping windows spread evenly over ``data`` (at most ``cap``)."""
    n = (len(data) - 1) // (seq + 1)
    idx = torch.arange(n) if n <= cap else torch.linspace(0, n - 1, cap).round().long()
    return windows(data, idx * (seq + 1), seq)


# ---------------------------------------------------------------------------- model
def make_model(cfg: dict):
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
        num_hidden_layers=cfg["layers"], max_position_embeddings=cfg["seq"],
        tie_word_embeddings=False, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def lm_loss(model, w: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=w[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), w[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, batch: int = 32) -> float:
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        total += float(lm_loss(model, chunk)) * len(chunk)
    model.train(was)
    return total / len(wins)


def schedule(total: int, warmup: int):
    def factor(step):  # step = number of optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---------------------------------------------------------------------------- stage 1
def pretrain(cfg, args, c1_train, fingerprint, log):
    key = {k: cfg[k] for k in ("hidden", "layers", "heads", "intermediate", "seq", "batch",
                               "pretrain_steps", "pretrain_lr")}
    key.update(seed=args.seed, corpus=fingerprint, torch=torch.__version__.split("+")[0])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"finetune_lora-pretrain-{digest}.pt")
    if os.path.exists(path) and not args.no_cache:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        log(f"stage 1: cached checkpoint {path} (final train loss "
            f"{blob['meta']['final_train_loss']:.3f})")
        return blob["state_dict"], {**blob["meta"], "cached": True, "checkpoint": path}
    torch.manual_seed(args.seed)
    model = make_model(cfg)
    model.train()
    steps = cfg["pretrain_steps"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["pretrain_lr"], betas=(0.9, 0.95),
                            weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 20)))
    starts = random_starts(steps, cfg["batch"], len(c1_train), cfg["seq"], args.seed + 1)
    losses, t0 = [], time.perf_counter()
    every = max(1, steps // 8)
    for step in range(steps):
        loss = lm_loss(model, windows(c1_train, starts[step], cfg["seq"]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(float(loss.detach()))
        if (step + 1) % every == 0 or step + 1 == steps:
            log(f"stage 1: step {step + 1}/{steps} train loss "
                f"{sum(losses[-every:]) / len(losses[-every:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    meta = dict(key=key, steps=steps, wall_s=time.perf_counter() - t0,
                final_train_loss=sum(losses[-10:]) / len(losses[-10:]),
                train_loss=losses[::max(1, steps // 100)])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    os.makedirs(args.cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, path)
    return state, {**meta, "cached": False, "checkpoint": path}


# ---------------------------------------------------------------------------- stage 2
def build(method: str, cfg, args, state_dict, lr: float):
    """(model, optimizer, LoRA pair dims) for one run; raises if the method cannot be built."""
    model = make_model(cfg)
    model.load_state_dict(state_dict)
    model.train()
    if method == "adafactor-full":
        return model, torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=0.0), []
    import peft
    torch.manual_seed(args.seed + 2)  # the same LoRA A draws for every LoRA run
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0))
    pairs = [(p.B.shape[0], p.A.shape[1]) for p in slimopt.lora.find_lora_pairs(model)]
    if method == "lora-adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    elif method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer
        opt = create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=lr,
                                        loraplus_lr_ratio=16, weight_decay=0.0)
    elif method == "riemannian":
        from peft.optimizers import create_riemannian_optimizer  # ImportError -> failed run
        opt = create_riemannian_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=lr,
                                          weight_decay=0.0)
    elif method == "adaprelora":
        opt = slimopt.AdaPreLoRA(model, lr=lr, weight_decay=0.0)
    elif method == "adaprelora-steps":
        opt = slimopt.AdaPreLoRA(model, lr=lr, weight_decay=0.0, momentum_on="steps")
    elif method == "adaprelora-beta1=0":
        opt = slimopt.AdaPreLoRA(model, lr=lr, weight_decay=0.0, beta1=0.0)
    else:
        raise ValueError(method)
    return model, opt, pairs


def finetune(method, lr, cfg, args, state_dict, data, starts, log):
    run = dict(method=method, lr=lr, status="ok", error=None)
    try:
        model, opt, pairs = build(method, cfg, args, state_dict, lr)
    except Exception as exc:  # e.g. peft without create_riemannian_optimizer
        run.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        log(f"  {method:18s} lr {lr:.0e}: FAILED to build: {run['error']}")
        return run
    steps, seq = cfg["steps"], cfg["seq"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, max(1, steps // 20)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    run.update(trainable_params=sum(p.numel() for p in trainable), lora_pairs=pairs,
               rank=args.rank if pairs else None)
    train_loss, curve = [], [(0, evaluate(model, data["val_sub"]))]
    train_s = 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        try:
            loss = lm_loss(model, windows(data["c2_train"], starts[step], seq))
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.clip)
            opt.step()
        except Exception as exc:
            train_s += time.perf_counter() - t0
            run.update(status="failed", error=f"step {step + 1}: {type(exc).__name__}: {exc}")
            break
        opt.zero_grad(set_to_none=True)
        sched.step()
        train_s += time.perf_counter() - t0
        train_loss.append(float(loss.detach()))
        if not math.isfinite(train_loss[-1]):
            run.update(status="diverged", error=f"non-finite train loss at step {step + 1}")
            break
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            curve.append((step + 1, evaluate(model, data["val_sub"])))
            if not math.isfinite(curve[-1][1]):
                run.update(status="diverged", error=f"non-finite val loss at step {step + 1}")
                break
    run.update(train_loss=train_loss, val_curve=curve, steps_done=len(train_loss),
               train_wall_s=train_s, step_s=train_s / max(1, len(train_loss)),
               state_bytes=slimopt.state_bytes(opt))
    if hasattr(opt, "nonfinite_skips"):
        run["nonfinite_skips"] = opt.nonfinite_skips()
    if run["status"] == "ok":
        final = {"c2_val": evaluate(model, data["c2_val"]),
                 "c2_test": evaluate(model, data["c2_test"]),
                 "c1_test": evaluate(model, data["c1_test"])}
        if not all(math.isfinite(v) for v in final.values()):
            run.update(status="diverged", error="non-finite final eval loss")
        run["final"] = final
    msg = (f"val {run['final']['c2_val']:.4f} test {run['final']['c2_test']:.4f} "
           f"c1 {run['final']['c1_test']:.4f}" if run["status"] == "ok"
           else f"{run['status'].upper()}: {run['error']}")
    log(f"  {method:18s} lr {lr:.0e}: {msg} | state {run['state_bytes']} B | "
        f"{train_s:.1f} s ({run['step_s'] * 1000:.0f} ms/step)")
    return run


# ---------------------------------------------------------------------------- report
def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return _finite(obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def summarize(runs, grids):
    summary = {}
    for method, grid in grids.items():
        mine = [r for r in runs if r["method"] == method]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            errors = sorted({f"lr {r['lr']:.0e}: {r['status']}: {r['error']}" for r in mine})
            summary[method] = dict(status="failed" if all(r["status"] == "failed" for r in mine)
                                   else "diverged", lr_grid=list(grid), notes="; ".join(errors))
            continue
        best = min(ok, key=lambda r: r["final"]["c2_val"])
        notes = [f"lr {r['lr']:.0e} {r['status']}" for r in mine if r["status"] != "ok"]
        edge = len(grid) > 1 and best["lr"] in (min(grid), max(grid))
        if edge:
            notes.append("best lr at the grid's edge")
        summary[method] = dict(
            status="ok", best_lr=best["lr"], lr_grid=list(grid), best_lr_at_edge=edge,
            c2_val=best["final"]["c2_val"], c2_test=best["final"]["c2_test"],
            c1_test=best["final"]["c1_test"], state_bytes=best["state_bytes"],
            trainable_params=best["trainable_params"], train_wall_s=best["train_wall_s"],
            step_ms=1000 * best["step_s"], lora_pairs=best["lora_pairs"], rank=best["rank"],
            val_by_lr={f"{r['lr']:g}": (r["final"]["c2_val"] if r["status"] == "ok" else None)
                       for r in mine},
            notes="; ".join(notes))
    return summary


def table(summary, baseline) -> str:
    lines = ["| method | best lr (grid) | corpus-2 val | corpus-2 test | corpus-1 test "
             "(forgetting) | state bytes | train wall s (ms/step) | notes |",
             "|---|---|---|---|---|---|---|---|",
             f"| pretrained, no fine-tuning | - | {baseline['c2_val']:.4f} | "
             f"{baseline['c2_test']:.4f} | {baseline['c1_test']:.4f} | - | - | |"]
    for method, s in summary.items():
        grid = ", ".join(f"{x:g}" for x in s["lr_grid"])
        if s["status"] != "ok":
            lines.append(f"| {method} | n/a ({grid}) | {s['status']} | - | - | - | - | "
                         f"{s['notes']} |")
            continue
        lines.append(f"| {method} | {s['best_lr']:g} ({grid}) | {s['c2_val']:.4f} | "
                     f"{s['c2_test']:.4f} | {s['c1_test']:.4f} | {s['state_bytes']:,} | "
                     f"{s['train_wall_s']:.1f} ({s['step_ms']:.0f}) | {s['notes']} |")
    return "\n".join(lines)


def plot(runs, summary, path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, s in summary.items():
        if s["status"] != "ok":
            continue
        run = next(r for r in runs if r["method"] == method and r["lr"] == s["best_lr"])
        steps, vals = zip(*run["val_curve"])
        ax1.plot(steps, vals, marker="o", ms=3, label=f"{method} (lr {s['best_lr']:g})")
        tl = torch.tensor(run["train_loss"])
        k = max(1, min(10, len(tl) // 5))
        smooth = torch.nn.functional.avg_pool1d(tl[None, None], k, 1).flatten() \
            if len(tl) >= k else tl
        ax2.plot(range(k, k + len(smooth)), smooth.tolist(), label=method)
    ax1.set(xlabel="step", ylabel="corpus-2 val loss (nats/byte)",
            title="held-out loss at each method's best lr")
    ax2.set(xlabel="step", ylabel="train loss (moving average)", title="train loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _git_commit():
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return head, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _machine(threads):
    import transformers
    try:
        import peft
        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    info = dict(platform=platform.platform(), processor=platform.processor() or None,
                python=platform.python_version(), cpu_count=os.cpu_count(), torch_threads=threads,
                torch=torch.__version__, transformers=transformers.__version__,
                peft=peft_version, slimopt=slimopt.__version__)
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        info["cpu"] = names[0] if names else None
    except OSError:
        pass
    return info


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---------------------------------------------------------------------------- main
def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _file_stem(text):
    if not text or text.startswith(".") or os.sep in text or "/" in text:
        raise argparse.ArgumentTypeError(f"expected a file name stem, got {text!r}")
    return text


def _positive_float(text):
    value = _nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parse_args(argv=None):
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(
        description=doc[0], epilog="\n\n".join(doc[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and data, few steps, the middle lr of each grid only "
                             "(smoke test)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu"),
                        help="folder for NAME.{json,md,png} (default %(default)s)")
    parser.add_argument("--name", type=_file_stem, default="finetune_lora",
                        help="stem of the result files (default %(default)s)")
    parser.add_argument("--cache-dir", default=None,
                        help="where the pretrained checkpoint is cached (default: "
                             "benchmarks/results/cache, or OUT/cache with --quick)")
    parser.add_argument("--no-cache", action="store_true", help="pretrain again even if cached")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--lrs", nargs="+", type=_positive_float, default=None,
                        help="one grid for every method instead of the per-method grids")
    for name, key in (("--steps", "steps"), ("--pretrain-steps", "pretrain_steps"),
                      ("--batch", "batch"), ("--seq", "seq"), ("--eval-every", "eval_every")):
        parser.add_argument(name, type=_positive_int, default=None,
                            help=f"default {FULL[key]} ({QUICK[key]} with --quick)")
    parser.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--clip", type=_nonneg_float, default=1.0,
                        help="gradient-norm clipping for every method (0: off)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the pretraining, the batches and the LoRA init; part of the "
                             "checkpoint's cache key (default %(default)s)")
    parser.add_argument("--threads", type=_positive_int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP "
                             "threads competing with other processes ran 20x slower)")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/finetune_lora.py", *argv_list])
    torch.set_num_threads(args.threads)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("steps", "pretrain_steps", "batch", "seq", "eval_every"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.cache_dir is None:
        args.cache_dir = (os.path.join(args.out, "cache") if args.quick
                          else os.path.join(HERE, "results", "cache"))
    grids = {m: tuple(args.lrs) if args.lrs else
             ((LR_GRIDS[m][len(LR_GRIDS[m]) // 2],) if args.quick else LR_GRIDS[m])
             for m in args.methods}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t_start, load_start = time.perf_counter(), _loadavg()

    root = _stdlib_dir()
    c1_train, c1_test, c1_info = load_corpus1(root)
    c2_train, c2_val, c2_test, c2_info = load_corpus2(root)
    if args.quick:  # keep the smoke test's data small
        c1_train, c1_test = c1_train[:400_000], c1_test[:40_000]
    c1_info.update(train_bytes=len(c1_train), test_bytes=len(c1_test))
    c2_info.update(train_bytes=len(c2_train), val_bytes=len(c2_val), test_bytes=len(c2_test))
    fingerprint = hashlib.sha256(c1_train).hexdigest()[:16]
    seq = cfg["seq"]
    shortest = min(len(c1_test), len(c2_train), len(c2_val), len(c2_test))
    if 2 * (seq + 1) > shortest:
        print(f"finetune_lora.py: error: --seq {seq} is too long for the data (the shortest "
              f"split holds {shortest} bytes)", file=sys.stderr)
        raise SystemExit(2)
    data = dict(c2_train=to_tensor(c2_train), c2_val=eval_windows(to_tensor(c2_val), seq,
                                                                  cfg["eval_cap"]),
                c2_test=eval_windows(to_tensor(c2_test), seq, cfg["eval_cap"]),
                c1_test=eval_windows(to_tensor(c1_test), seq, cfg["eval_cap"]))
    data["val_sub"] = eval_windows(to_tensor(c2_val), seq, cfg["val_windows"])
    log(f"data: corpus 1 {len(c1_train):,} train / {len(c1_test):,} held-out bytes; corpus 2 "
        f"{len(c2_train):,} / {len(c2_val):,} / {len(c2_test):,} bytes (train/val/test); "
        f"{c2_info['source']}")

    state_dict, pre = pretrain(cfg, args, to_tensor(c1_train), fingerprint, log)
    base = make_model(cfg)
    base.load_state_dict(state_dict)
    baseline = {k: evaluate(base, data[k]) for k in ("c2_val", "c2_test", "c1_test")}
    log(f"pretrained model: corpus-2 val {baseline['c2_val']:.4f}, corpus-1 held-out "
        f"{baseline['c1_test']:.4f}")

    starts = random_starts(cfg["steps"], cfg["batch"], len(data["c2_train"]), seq,
                           args.seed + 3)
    n_runs = sum(len(g) for g in grids.values())
    log(f"stage 2: {n_runs} runs of {cfg['steps']} steps (batch {cfg['batch']} x {seq} bytes)")
    runs = []
    for method, grid in grids.items():
        for lr in grid:
            runs.append(finetune(method, lr, cfg, args, state_dict, data, starts, log))
    summary = summarize(runs, grids)
    total_s = time.perf_counter() - t_start
    md_table = table(summary, baseline)
    print()
    print(md_table)

    commit, dirty = _git_commit()
    result = dict(
        benchmark="finetune_lora", command=command, git_commit=commit, git_dirty=dirty,
        machine=_machine(args.threads), loadavg_start=load_start, loadavg_end=_loadavg(),
        total_wall_s=total_s, quick=args.quick,
        config=dict(cfg, rank=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                    target_modules=TARGETS, clip=args.clip, seed=args.seed,
                    warmup_steps=max(1, cfg["steps"] // 20), schedule="linear warmup, cosine "
                    "to 10% of peak", lr_grids={m: list(g) for m, g in grids.items()},
                    loss="cross-entropy, nats per byte"),
        data=dict(corpus1=c1_info, corpus2=c2_info, eval_windows={
            k: len(data[k]) for k in ("c2_val", "c2_test", "c1_test", "val_sub")}),
        pretrain={k: v for k, v in pre.items() if k != "key"}, baseline=baseline,
        summary=summary, runs=runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(_clean(result), f, indent=1)
    png = os.path.join(args.out, f"{args.name}.png")
    plotted = not args.no_plot and plot(runs, summary, png)
    cpu = result["machine"].get("cpu") or result["machine"]["processor"] or "unknown CPU"
    md = [f"# LoRA fine-tuning benchmark{' (--quick)' if args.quick else ''}", "",
          f"Command: `{command}`  ",
          f"Commit: `{commit}`{' (uncommitted changes in the tree)' if dirty else ''}  ",
          f"Machine: {cpu}, {args.threads} torch threads, {platform.platform()}; torch "
          f"{torch.__version__}, transformers {result['machine']['transformers']}, peft "
          f"{result['machine']['peft']}; load average at start/end {load_start} / "
          f"{result['loadavg_end']} (wall times are noisy on a shared machine)  ",
          f"Total wall time: {total_s / 60:.1f} min", "",
          f"Byte-level LlamaForCausalLM (hidden {cfg['hidden']}, {cfg['layers']} layers, "
          f"{cfg['heads']} heads, intermediate {cfg['intermediate']}, vocab 256) pretrained "
          f"{pre['steps']} AdamW steps on corpus 1 ({c1_info['source']}; final train loss "
          f"{pre['final_train_loss']:.3f}), then fine-tuned {cfg['steps']} steps (batch "
          f"{cfg['batch']} x {seq} bytes, same batches for every run) on corpus 2 "
          f"({c2_info['source']}). LoRA r={args.rank}, alpha={2 * args.rank}, all 7 "
          "projections; warmup + cosine; grad clip "
          f"{args.clip}. Best lr = lowest final corpus-2 *val* loss; the other columns are at "
          "that lr. Losses in nats/byte.", "", md_table, "",
          "Final corpus-2 val loss for every lr:", "",
          "| method | " + " | ".join(["lr -> val loss"]) + " |", "|---|---|"]
    for method in grids:
        cells = []
        for r in (r for r in runs if r["method"] == method):
            cells.append(f"{r['lr']:g}: " + (f"{r['final']['c2_val']:.4f}"
                                             if r["status"] == "ok" else r["status"]))
        md.append(f"| {method} | {'; '.join(cells)} |")
    if plotted:
        md += ["", f"![loss curves]({args.name}.png)"]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    log(f"\nwrote {args.out}/{args.name}.json, .md{', .png' if plotted else ''} "
        f"({total_s / 60:.1f} min)")
    return result


if __name__ == "__main__":
    main()
