"""``slimopt-pretrain``: pretrain a LLaMA-style model from scratch with any slimopt optimizer or a
peer, single process or under torchrun (DDP), offline by default.

    slimopt-pretrain --preset tiny                          # GrassWalk on the stdlib corpus
    slimopt-pretrain --preset tiny --optimizer adamw
    torchrun --nproc_per_node 2 -m slimopt.launch.pretrain --preset tiny
    slimopt-pretrain --preset 60m --data corpus.jsonl --optimizer grassjump --rank 128

What it does: a ``transformers.LlamaForCausalLM`` of the preset's shape; data through
``slimopt.launch.data`` (default: the Python standard library's source, byte-level BPE trained by
``tokenizers`` on first use and cached); cosine schedule with linear warmup down to
``--min-lr-ratio``; gradient clipping; bf16 autocast where the hardware has it; TensorBoard logs
(loss, eval perplexity, lr, gradient norm, tokens/s, optimizer-state bytes, subspace movement and
recovery norms) under ``OUTPUT/tb``; a progress bar; checkpoints every ``--save-every`` steps
holding model, optimizer, schedule, RNG and the data position, so ``--resume`` continues without
repeating or skipping a batch. At the end it prints the eval perplexity and the optimizer-state
bytes next to what AdamW would hold, and writes them to ``OUTPUT/result.json`` with the loss
curve (``curve``: step, tokens, mean train loss since the previous point and eval loss at every
``--eval-every`` evaluation and the last step).

Every user error (missing data, unknown preset or optimizer, a bad or mismatched checkpoint) is a
one-line message and exit code 2, not a traceback.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time

import torch

from ..state_bytes import state_bytes
from .cli_errors import OneLineParser
from .checkpoint_io import (CheckpointError, RunLock, check_writable_dir, load_verified,
                            save_atomic, verify_tag_digests, write_tag_digests)
from .data import DataError, batch_at, load_documents, token_blocks, tokenizer_for
from .presets import PRESETS, llama_config
from .registry import KNOWN, RANKED, build_optimizer
from .resume import ResumeError, apply_schedule, check_position, check_settings, run_settings

#: 2: a SHA-256 digest in every file and every run setting recorded (version 1 still loads)
CHECKPOINT_VERSION = 2
DEFAULT_GRAD_CLIP = 1.0


class UsageError(Exception):
    """Reported as ``slimopt-pretrain: error: ...`` with exit code 2."""


def parse_args(argv=None):
    p = OneLineParser(prog="slimopt-pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help=f"model preset: {', '.join(PRESETS)}")
    p.add_argument("--optimizer", default="grasswalk", help=f"one of {sorted(KNOWN)}")
    p.add_argument("--opt-args", default="{}", help="extra optimizer keyword arguments as JSON")
    p.add_argument("--lr", type=float)
    p.add_argument("--rank", type=int, help="subspace rank (ranked optimizers)")
    p.add_argument("--update-interval", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, in sequences")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, help="0 disables clipping (default 1.0)")
    p.add_argument("--data", help="local .txt/.json/.jsonl/.parquet file or folder, or a hub "
                                  "dataset name; default: the Python stdlib source")
    p.add_argument("--text-column", default="text")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--max-chars", type=int, help="characters of the corpus to use (default: "
                   "the preset's)")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint period (0: at the end)")
    p.add_argument("--output-dir", help="default: runs/<preset>-<optimizer>")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                       "slimopt"))
    p.add_argument("--resume", help="a checkpoint file, or 'auto' for OUTPUT/checkpoint-latest.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (through slimopt.launch.initialize;"
                   " ZeRO stage 0-3)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    # testing aid: stop right after step N as if the run had been killed there
    p.add_argument("--halt-after", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        p.error(f"unknown preset {args.preset!r}; known: {', '.join(PRESETS)}")
    args.optimizer = args.optimizer.lower()
    if args.optimizer not in KNOWN:
        p.error(f"unknown optimizer {args.optimizer!r}; known: {', '.join(sorted(KNOWN))}")
    try:
        args.opt_args = json.loads(args.opt_args)
        if not isinstance(args.opt_args, dict):
            raise ValueError
    except ValueError:
        p.error(f"--opt-args must be a JSON object, got {args.opt_args!r}")
    defaults = PRESETS[args.preset][1]
    for key in ("lr", "rank", "update_interval", "steps", "batch_size", "seq_len", "warmup",
                "eval_every", "vocab_size", "max_chars"):
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                "rank", "update_interval", "vocab_size", "max_chars"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("warmup", "save_every"):
        if getattr(args, key) < 0:
            p.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    if args.grad_clip is not None and not (args.grad_clip >= 0 and math.isfinite(args.grad_clip)):
        p.error(f"--grad-clip must be a finite number >= 0 (0 disables clipping), got "
                f"{args.grad_clip}")
    if not 0 <= args.min_lr_ratio <= 1:  # also refuses nan
        p.error(f"--min-lr-ratio must be in [0, 1] (the final lr as a fraction of --lr), got "
                f"{args.min_lr_ratio}")
    if args.threads < 0:
        p.error(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    if args.halt_after < 0:
        p.error(f"--halt-after must be >= 0, got {args.halt_after}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.vocab_size < 260:
        p.error(f"--vocab-size must be >= 260 (256 bytes + specials), got {args.vocab_size}")
    args.optimizer_given = any(a == "--optimizer" or a.startswith("--optimizer=")
                               for a in (argv if argv is not None else sys.argv[1:]))
    args.output_dir = args.output_dir or os.path.join("runs", f"{args.preset}-{args.optimizer}")
    return args


# ---------------------------------------------------------------------------- distributed
def setup_distributed():
    """``(rank, world, device)``; initializes the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def all_mean(value: float, world: int, device) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t) / world


# ---------------------------------------------------------------------------- schedule
def lr_lambda(args):
    def factor(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine
    return factor


# ---------------------------------------------------------------------------- diagnostics
class SubspaceDiagnostics:
    """How far each low-rank basis moved at its last change (``1 - ||S_old^T S_new||_F^2 / r``:
    0 = same subspace, 1 = orthogonal) and the mean recovery norm, read from the optimizer."""

    def __init__(self):
        self.previous = {}

    def collect(self, opt) -> dict:
        if not hasattr(opt, "current_basis"):
            return {}
        moves, recovery = [], []
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "recovery_norm" in state:
                    recovery.append(state["recovery_norm"])
                if not state or state.get("step", 0) == 0 or not opt.takes_matrix_rule(p, group):
                    continue
                if (state["step"] - 1) % group["update_interval"] != 0:
                    continue
                basis = opt.current_basis(p).float()
                old = self.previous.get(id(p))
                if old is not None:
                    overlap = float((old.T @ basis).square().sum()) / basis.shape[1]
                    moves.append(1.0 - overlap)
                self.previous[id(p)] = basis.clone()
        out = {}
        if moves:
            out["optimizer/subspace_move"] = sum(moves) / len(moves)
        if recovery:
            out["optimizer/recovery_norm"] = sum(recovery) / len(recovery)
        return out


def adamw_state_bytes(config) -> int:
    """What torch's AdamW would hold for this model: counted on the meta device."""
    import transformers
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    return state_bytes(opt)


def curve_point(step, args, loss_sum, loss_count, eval_loss) -> dict:
    """One point of the result's ``curve``: the step, the tokens trained on up to it (global batch
    x sequence length x step, counted from step 0 also in a resumed run), the mean training loss
    over the steps since the previous point (None if none ran in this process) and the eval
    loss."""
    return {"step": step, "tokens": step * args.batch_size * args.seq_len,
            "train_loss": loss_sum / loss_count if loss_count else None, "eval_loss": eval_loss}


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, opt, sched, step, args, world):
    """The step's checkpoint and ``checkpoint-latest.pt``, each written atomically with a digest."""
    payload = {"version": CHECKPOINT_VERSION, "step": step, "data_position": step,
               "model": model.state_dict(), "optimizer": opt.state_dict(),
               "scheduler": sched.state_dict(), "rng": torch.get_rng_state(),
               "args": run_settings(args), "world_size": world}
    save_atomic(payload, path)
    latest = os.path.join(os.path.dirname(path), "checkpoint-latest.pt")
    if os.path.abspath(latest) != os.path.abspath(path):
        save_atomic(payload, latest)


def latest_checkpoint(args):
    """``--resume auto``: the run's latest checkpoint, or None when it has none yet."""
    if args.deepspeed:
        folder = os.path.join(args.output_dir, "deepspeed")
        return folder if os.path.isfile(os.path.join(folder, "latest")) else None
    path = os.path.join(args.output_dir, "checkpoint-latest.pt")
    return path if os.path.exists(path) else None


CHECKPOINT_KEYS = ("step", "data_position", "model", "optimizer", "scheduler", "rng", "args")


def load_checkpoint(path, args):
    """A verified ``slimopt-pretrain`` checkpoint this run may continue (see ``resume``)."""
    try:
        ckpt = load_verified(path)
    except CheckpointError as err:
        raise UsageError(f"--resume {err}") from None
    if ckpt.get("version") not in (1, CHECKPOINT_VERSION):
        raise UsageError(f"--resume {path}: not a slimopt-pretrain checkpoint (version "
                         f"{ckpt.get('version')!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise UsageError(f"--resume {path}: incomplete checkpoint (no {', '.join(missing)})")
    if ckpt["data_position"] != ckpt["step"]:
        raise UsageError(f"--resume {path}: data position {ckpt['data_position']!r} differs "
                         f"from step {ckpt['step']!r}")
    check_position(ckpt["step"], args, path)
    if ckpt["sha256"] is None:
        print(f"note: {path} carries no digest (written by an older slimopt): not verified")
    return ckpt


def load_deepspeed_config(args, world):
    """The DeepSpeed JSON, checked against the CLI: the global batch, clipping and bf16 must
    agree (a missing value is filled in from the CLI); a non-slimopt optimizer section is
    refused, and a slimopt one must match an explicit --optimizer."""
    try:
        with open(args.deepspeed) as f:
            cfg = json.load(f)
    except OSError as err:
        raise UsageError(f"--deepspeed {args.deepspeed}: {err.strerror}") from None
    except ValueError as err:
        raise UsageError(f"--deepspeed {args.deepspeed}: not valid JSON ({err})") from None
    check_deepspeed_shape(cfg, args.deepspeed)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps", 1)
    if micro is None:
        micro = args.batch_size // (world * accum)
        cfg["train_micro_batch_size_per_gpu"] = micro
    total = cfg.get("train_batch_size", micro * accum * world)
    if micro * accum * world != args.batch_size or total != args.batch_size:
        raise UsageError(f"--deepspeed {args.deepspeed} contradicts --batch-size "
                         f"{args.batch_size}: micro batch {micro} x accumulation {accum} x "
                         f"{world} ranks = {micro * accum * world}")
    cfg.pop("train_batch_size", None)
    clip = cfg.get("gradient_clipping")
    if clip is not None and args.grad_clip is not None and clip != args.grad_clip:
        raise UsageError(f"--deepspeed {args.deepspeed} sets gradient_clipping {clip} but "
                         f"--grad-clip is {args.grad_clip}")
    cfg["gradient_clipping"] = clip if clip is not None else (
        args.grad_clip if args.grad_clip is not None else DEFAULT_GRAD_CLIP)
    bf16 = bool(cfg.get("bf16", {}).get("enabled", False))
    if (args.bf16 == "on" and not bf16) or (args.bf16 == "off" and bf16):
        raise UsageError(f"--deepspeed {args.deepspeed} has bf16 {'on' if bf16 else 'off'} "
                         f"but --bf16 is {args.bf16}")
    section = cfg.get("optimizer")
    if section is not None:
        kind = str(section.get("type", ""))
        if not kind.lower().startswith("slimopt."):
            raise UsageError(f"--deepspeed {args.deepspeed} names optimizer {kind!r}: name a "
                             "slimopt.* optimizer there, or drop the section and use --optimizer")
        name = kind[len("slimopt."):].lower()
        if args.optimizer_given and name != args.optimizer:
            raise UsageError(f"--deepspeed {args.deepspeed} names {kind} but --optimizer is "
                             f"{args.optimizer}")
        args.optimizer = name
    cfg.setdefault("steps_per_print", 10 ** 9)
    return cfg


def check_deepspeed_shape(cfg, path) -> None:
    """The parts of a DeepSpeed JSON this CLI reads must have the types DeepSpeed documents."""
    if not isinstance(cfg, dict):
        raise UsageError(f"--deepspeed {path}: the top level must be a JSON object, got "
                         f"{type(cfg).__name__}")
    for key in ("bf16", "fp16", "optimizer", "zero_optimization"):
        if key in cfg and not isinstance(cfg[key], dict):
            raise UsageError(f"--deepspeed {path}: {key!r} must be a JSON object, got "
                             f"{type(cfg[key]).__name__}")
    params = cfg.get("optimizer", {}).get("params", {})
    if not isinstance(params, dict):
        raise UsageError(f"--deepspeed {path}: optimizer.params must be a JSON object, got "
                         f"{type(params).__name__}")
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "train_batch_size"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise UsageError(f"--deepspeed {path}: {key} must be an integer >= 1, got {value!r}")


def _read_latest(folder) -> str:
    latest = os.path.join(folder, "latest")
    if not os.path.isfile(latest):
        raise UsageError(f"{folder} has no 'latest' file: pass the tag folder to --resume")
    with open(latest) as f:
        return f.read().strip()


def _zero_checkpoint_world(folder, tag):
    """The number of ranks that wrote a ZeRO-1/2/3 checkpoint (0 for ZeRO-0 or none)."""
    tag = tag or _read_latest(folder)
    return len(glob.glob(os.path.join(folder, tag, "*_optim_states.pt")))


def save_deepspeed_checkpoint(engine, args, step) -> None:
    folder = os.path.join(args.output_dir, "deepspeed")
    try:
        engine.save_checkpoint(folder, tag=f"step{step}",
                               client_state={"data_position": step, "args": run_settings(args)})
    except (OSError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"could not write the DeepSpeed checkpoint under {folder} "
                              f"({first})") from None
    write_tag_digests(os.path.join(folder, f"step{step}"), engine.global_rank)


def _deepspeed_source(args):
    """``(folder, tag)`` of ``--resume`` for a DeepSpeed run (tag None: the folder's latest)."""
    if args.resume == "auto":
        return os.path.join(args.output_dir, "deepspeed"), None
    path = os.path.normpath(args.resume)
    return os.path.dirname(path), os.path.basename(path)


def load_deepspeed_checkpoint(engine, args):
    """Load a DeepSpeed checkpoint into ``engine`` (every file checked first, see
    ``safe_load.check_deepspeed_tag``); return its client state."""
    from .safe_load import check_deepspeed_tag
    folder, tag = _deepspeed_source(args)
    if not os.path.isdir(folder):
        raise UsageError(f"--resume {args.resume}: no DeepSpeed checkpoint folder {folder}")
    try:
        check_deepspeed_tag(folder, tag)
        tag_dir = os.path.join(folder, tag or _read_latest(folder))
        if not verify_tag_digests(tag_dir):
            print(f"note: {tag_dir} carries no digests (written by an older slimopt or by "
                  "DeepSpeed directly): not verified")
    except ValueError as err:
        raise UsageError(f"--resume {args.resume}: {err}") from None
    saved_world = _zero_checkpoint_world(folder, tag)
    try:
        if saved_world and saved_world != engine.dp_world_size:
            # written at another world size: merge the ranks' states (slimopt's own format)
            from .zero_checkpoint import load_resharded
            path, client = folder, load_resharded(engine, folder, tag)
        else:
            path, client = engine.load_checkpoint(folder, tag=tag)
    except Exception as err:
        first = (str(err).strip().splitlines() or ["no message"])[0][:300]
        raise UsageError(f"--resume {args.resume}: DeepSpeed could not load it "
                         f"({type(err).__name__}: {first})") from None
    if path is None or not client:
        raise UsageError(f"--resume {args.resume}: no checkpoint found")
    missing = [k for k in ("data_position", "args") if k not in client]
    if missing:
        raise UsageError(f"--resume {args.resume}: incomplete checkpoint (no "
                         f"{', '.join(missing)})")
    return client


# ---------------------------------------------------------------------------- main loop
@torch.no_grad()
def evaluate(model, blocks, args, device, autocast):
    model.eval()
    losses = []
    n = min(args.eval_batches, max(1, len(blocks) // args.batch_size))
    for i in range(n):
        ids = blocks[i * args.batch_size:(i + 1) * args.batch_size].long().to(device)
        with autocast():
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    return sum(losses) / len(losses)


def documents_digest(docs) -> str:
    """SHA-256 of the documents a run trains on (their lengths and text, in order)."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(f"{len(doc)}:".encode())
        h.update(doc.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def run(args):
    rank, world, device = setup_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size % world:
        raise UsageError(f"--batch-size {args.batch_size} is not divisible by the "
                         f"{world} ranks")
    # unusable folders are found now, not at the first save after hours of training
    check_writable_dir(args.cache_dir, "--cache-dir")
    check_writable_dir(args.output_dir, "--output-dir")
    lock = RunLock(args.output_dir) if rank == 0 else None
    try:
        return train(args, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def load_data(args, say):
    """``(train blocks, eval blocks, tokenizer)``; records the data's and tokenizer's digests
    in ``args`` (a resumed run must see the same)."""
    docs, corpus_id = load_documents(args.data, text_column=args.text_column,
                                     max_chars=args.max_chars)
    args.data_sha256 = documents_digest(docs)
    tokenizer = tokenizer_for(docs, corpus_id, args.vocab_size, args.cache_dir)
    args.tokenizer_sha256 = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    train_blocks, eval_blocks = token_blocks(docs, tokenizer, args.seq_len, corpus_id,
                                             args.cache_dir)
    say(f"data: {len(docs):,} documents ({corpus_id}), {train_blocks.numel():,} train tokens, "
        f"{eval_blocks.numel():,} held out, vocab {tokenizer.get_vocab_size():,}")
    return train_blocks, eval_blocks, tokenizer


def make_optimizer(args, model, ds_config):
    options = dict(args.opt_args)
    if args.optimizer in RANKED:
        options.setdefault("update_interval", args.update_interval)
    if args.weight_decay:
        options.setdefault("weight_decay", args.weight_decay)
    elif args.optimizer not in ("muon", "galore"):
        options.setdefault("weight_decay", 0.0)
    try:
        section = ds_config.pop("optimizer", None) if ds_config else None
        if section is not None:
            from .zero import build_from_config
            section.setdefault("params", {}).setdefault("lr", args.lr)
            return build_from_config(section, model)
        return build_optimizer(args.optimizer, model, lr=args.lr, rank=args.rank, **options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--optimizer {args.optimizer}: {err}") from None


def resume(args, model, opt, sched, engine, say) -> int:
    """Continue from ``--resume``: returns the step to start from (0: a fresh start)."""
    if args.resume == "auto" and latest_checkpoint(args) is None:
        say(f"--resume auto: no checkpoint under {args.output_dir} yet; starting from step 0")
        return 0
    source = args.resume
    if engine is not None:
        client = load_deepspeed_checkpoint(engine, args)
        saved, step = client["args"], client["data_position"]
    else:
        ckpt = load_checkpoint(latest_checkpoint(args) if source == "auto" else source, args)
        saved, step = ckpt["args"], ckpt["step"]
    for note in check_settings(saved, args, source):
        say(f"--resume: {note}")
    step = check_position(step, args, source)
    if engine is None:
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            torch.set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise UsageError(f"--resume {source}: its state does not fit this run ({first})") \
                from None
    apply_schedule(sched, saved.get("lr") if isinstance(saved, dict) else None, args.lr)
    say(f"resumed from step {step}")
    return step


def train(args, rank, world, device):
    import transformers
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    train_blocks, eval_blocks, tokenizer = load_data(args, say)
    config = llama_config(args.preset, tokenizer.get_vocab_size(), args.seq_len)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    ds_config = load_deepspeed_config(args, world) if args.deepspeed else None
    opt = make_optimizer(args, model, ds_config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    engine = None
    train_model = model
    if ds_config is not None:
        from .zero import initialize
        try:
            engine, _, _, sched = initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                             config=ds_config)
        except ValueError as err:
            raise UsageError(f"--deepspeed {args.deepspeed}: {err}") from None
        train_model = engine
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    start = resume(args, model, opt, sched, engine, say) if args.resume else 0

    use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda"
                                     and torch.cuda.is_bf16_supported())

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    writer = None
    if is_main and not args.no_tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(os.path.join(args.output_dir, "tb"))
        except ImportError:
            say("tensorboard not installed: no TensorBoard logs (pip install tensorboard)")
    progress = None
    if is_main and not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=args.steps, initial=start, desc=args.optimizer, unit="step")
        except ImportError:
            pass

    diagnostics = SubspaceDiagnostics()
    rows = args.batch_size // world
    tokens_seen, t0, eval_loss = 0, time.time(), None
    # the loss curve (``curve`` in the result): one point per evaluation; train_loss is the mean
    # training loss over the steps since the previous point, tokens the global count at the step
    curve, loss_sum, loss_count, done = [], 0.0, 0, start
    for step in range(start, args.steps):
        batch = batch_at(train_blocks, step, args.batch_size, args.seed)
        ids = batch[rank * rows:(rank + 1) * rows].to(device)
        if engine is not None:  # DeepSpeed: micro-batches, clipping and the schedule inside
            micro = engine.train_micro_batch_size_per_gpu()
            for a in range(engine.gradient_accumulation_steps()):
                part = ids[a * micro:(a + 1) * micro]
                loss = engine(input_ids=part, labels=part).loss
                engine.backward(loss)
                engine.step()
            grad_norm = engine.get_global_grad_norm() or 0.0
            if not engine.was_step_applied():  # DeepSpeed's own skip: never a silent one
                say(f"step {step + 1}: DeepSpeed discarded the update (non-finite gradient "
                    f"norm); {engine.skipped_steps} discarded so far")
        else:
            with autocast():
                loss = train_model(input_ids=ids, labels=ids).loss
            loss.backward()
            clip = args.grad_clip if args.grad_clip is not None else DEFAULT_GRAD_CLIP
            grad_norm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), clip if clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        tokens_seen += ids.numel() * world
        done = step + 1
        loss_value = all_mean(float(loss.detach()), world, device)
        loss_sum, loss_count = loss_sum + loss_value, loss_count + 1
        rate = tokens_seen / max(time.time() - t0, 1e-9)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{rate:,.0f}")
        if writer is not None and (done % args.log_every == 0 or done == args.steps):
            writer.add_scalar("train/loss", loss_value, done)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], done)
            writer.add_scalar("train/grad_norm", float(grad_norm), done)
            writer.add_scalar("train/tokens_per_s", rate, done)
            writer.add_scalar("optimizer/state_bytes", state_bytes(opt), done)
        if writer is not None:
            for key, value in diagnostics.collect(opt).items():
                writer.add_scalar(key, value, done)
        if done % args.eval_every == 0 or done == args.steps:
            eval_loss = all_mean(evaluate(model, eval_blocks, args, device, autocast), world,
                                 device)
            curve.append(curve_point(done, args, loss_sum, loss_count, eval_loss))
            loss_sum, loss_count = 0.0, 0
            if writer is not None:
                writer.add_scalar("eval/loss", eval_loss, done)
                writer.add_scalar("eval/perplexity", math.exp(min(eval_loss, 50)), done)
            if progress is None:
                say(f"step {done}: train loss {loss_value:.4f}, eval loss {eval_loss:.4f}")
        due = args.save_every and done % args.save_every == 0 or done == args.steps
        if engine is not None and due:
            save_deepspeed_checkpoint(engine, args, done)
        elif is_main and due:
            save_checkpoint(os.path.join(args.output_dir, f"checkpoint-{done}.pt"), model, opt,
                            sched, done, args, world)
        if args.halt_after and done >= args.halt_after:
            say(f"halted after step {done} (--halt-after)")
            break
    if progress is not None:
        progress.close()
    if writer is not None:
        writer.close()

    if eval_loss is None:  # halted before the first evaluation
        eval_loss = all_mean(evaluate(model, eval_blocks, args, device, autocast), world, device)
        curve.append(curve_point(done, args, loss_sum, loss_count, eval_loss))
    ours, adamw = state_bytes(opt), adamw_state_bytes(config)
    result = dict(optimizer=args.optimizer, preset=args.preset, params=n_params,
                  steps=args.steps, eval_loss=eval_loss,
                  eval_perplexity=math.exp(eval_loss) if eval_loss is not None else None,
                  state_bytes=ours, adamw_state_bytes=adamw,
                  seconds=time.time() - t0, tokens=tokens_seen, curve=curve)
    say(f"\nfinal eval loss {eval_loss:.4f}, perplexity {result['eval_perplexity']:.2f} "
        f"({args.preset}, {n_params / 1e6:.2f}M parameters, {args.steps} steps)")
    share = " on this rank (ZeRO shards it)" if engine is not None and world > 1 else ""
    say(f"optimizer state: {ours:,} bytes ({args.optimizer}){share}; torch AdamW would hold "
        f"{adamw:,} bytes in one process ({ours / adamw:.0%})")
    if is_main:
        with open(os.path.join(args.output_dir, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def execute(argv=None) -> dict:
    """Parse ``argv``, train, and return the result dict (``SystemExit(2)`` on user errors)."""
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError, CheckpointError, ResumeError) as err:
        print(f"slimopt-pretrain: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def main(argv=None) -> int:
    """The console script: exit code 0 on success."""
    execute(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
