"""Everything a ``slimopt-pretrain`` run is built from before its first step: the process group,
the data, the model, the optimizer and its schedule, and the DDP or DeepSpeed wrapper, held in one
``Run``."""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass

import torch

from .data import DataError, open_corpus
from .deepspeed_config import load_deepspeed_config
from .presets import llama_config
from .records import BY_NAME
from .registry import RANKED, build_optimizer, cli_defaults
from .token_shards import token_shards
from .tokenizer import run_tokenizer
from .train_config import UsageError


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


# ---------------------------------------------------------------------------- data
def load_data(args, say):
    """``(train blocks, eval blocks, tokenizer)``: the corpus streamed into token shards under
    ``--cache-dir`` (or those cached), read as ``--seq-len`` blocks; records the data's and
    tokenizer's digests in ``args`` (a resumed run must see the same)."""
    corpus = open_corpus(args.data, text_column=args.text_column, max_chars=args.max_chars)
    tokenizer = run_tokenizer(args, corpus, say)
    shards = token_shards(corpus, tokenizer, args.cache_dir, say)
    # the record holds the tokenizer's digest, checked against it when the cache is opened
    args.data_sha256 = shards.record["data_sha256"]
    args.tokenizer_sha256 = shards.record["tokenizer_sha256"]
    train_blocks, eval_blocks = shards.blocks(args.seq_len)
    record = shards.record
    say(f"data: {record['documents']:,} documents ({corpus.corpus_id}), "
        f"{train_blocks.numel():,} train tokens, {eval_blocks.numel():,} held out, "
        f"vocab {tokenizer.vocab_size:,} ({tokenizer.name}); tokens in {shards.path}")
    if record["truncated"]:
        say(f"data: cut at --max-chars {args.max_chars:,} characters; the source has more "
            "(raise --max-chars to use it)")
    return train_blocks, eval_blocks, tokenizer


def load_data_once_per_node(args, say, world, device):
    """``load_data`` on every rank, the token shards built once per node: each node's local rank
    0 trains the tokenizer and writes the shards while the node's other ranks wait, which then
    read the cached files (a cold cache is not tokenized ``world`` times). A builder's failure
    reaches every rank: the builder raises its own error, the others a ``DataError`` pointing to
    it, so no rank is left waiting."""
    if world == 1:
        return load_data(args, say)
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0
    loaded, failure = None, None
    if builder:
        try:
            loaded = load_data(args, say)
        except Exception as err:  # noqa: BLE001 -- re-raised below, after the other ranks know
            failure = err
    failed = torch.tensor([float(failure is not None)], device=device)
    torch.distributed.all_reduce(failed)
    if failure is not None:
        raise failure
    if float(failed) > 0:
        raise DataError("the data could not be prepared on another rank (its local rank 0, "
                        "which builds the token cache for its node): see that rank's error")
    return loaded if builder else load_data(args, say)


# ---------------------------------------------------------------------------- optimizer
def set_default_weight_decay(options, args) -> None:
    """``--weight-decay`` unless ``--opt-args`` sets it; without it, the method record's launcher
    default (``records.cli_defaults``: 0, or the peer package's own)."""
    if args.weight_decay:
        options.setdefault("weight_decay", args.weight_decay)
    else:
        for key, value in cli_defaults(args.optimizer).items():
            options.setdefault(key, value)


def set_default_seed(options, args) -> None:
    """``--seed`` seeds a slimopt optimizer's random draws too (its ``seed`` option, unless
    ``--opt-args`` sets it), so that a run's seed covers its random subspaces as well as its
    initial weights and data order; 0 is every optimizer's own default."""
    method = BY_NAME.get(args.optimizer.lower())
    if method is not None and not method.is_peer and isinstance(method.build, type) \
            and "seed" in inspect.signature(method.build).parameters:
        options.setdefault("seed", args.seed)


def make_optimizer(args, model, ds_config):
    """The optimizer of ``--optimizer`` (or of the DeepSpeed config's ``optimizer`` section,
    which is taken out of ``ds_config``)."""
    options = dict(args.opt_args)
    if args.optimizer in RANKED:
        options.setdefault("update_interval", args.update_interval)
    set_default_weight_decay(options, args)
    set_default_seed(options, args)
    if args.state_dtype not in (None, "float32"):  # float32: every slimopt optimizer's default
        options["state_dtype"] = args.state_dtype
    try:
        section = ds_config.pop("optimizer", None) if ds_config else None
        if section is not None:
            from .zero import build_from_config
            section.setdefault("params", {}).setdefault("lr", args.lr)
            return build_from_config(section, model)
        return build_optimizer(args.optimizer, model, lr=args.lr, rank=args.rank, **options)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--optimizer {args.optimizer}: {err}") from None


def checkpoint_activations(model) -> None:
    """transformers' activation checkpointing of every decoder layer, non-reentrant (the layer's
    forward runs again in backward instead of keeping its activations; the same gradients).
    transformers 5 names it ``activation_checkpointing_enable``, 4.x
    ``gradient_checkpointing_enable``."""
    model.config.use_cache = False  # no key/value cache while recomputing
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lr_lambda(args):
    """Linear warmup over ``--warmup`` steps, then cosine down to ``--min-lr-ratio``."""
    def factor(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine
    return factor


# ---------------------------------------------------------------------------- the run
@dataclass
class Run:
    """What the training loop works on. ``train_model`` is what the forward pass calls (the
    model, its DDP wrapper or the DeepSpeed engine); ``engine`` is None without DeepSpeed."""
    args: object
    rank: int
    world: int
    device: torch.device
    say: object
    train_blocks: object        # token_shards.TokenBlocks
    eval_blocks: object
    config: object              # the model's transformers.LlamaConfig
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    sched: object
    n_params: int = 0           # counted before DeepSpeed partitions the model
    engine: object = None
    train_model: object = None
    use_bf16: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)


def build_run(args, rank, world, device) -> Run:
    """Data, model, optimizer, schedule and the DDP or DeepSpeed wrapper, in that order."""
    import transformers
    say = print if rank == 0 else (lambda *a, **k: None)
    train_blocks, eval_blocks, tokenizer = load_data_once_per_node(args, say, world, device)
    config = llama_config(args.preset, tokenizer.vocab_size, args.seq_len)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config).to(device)
    if args.activation_checkpointing:
        checkpoint_activations(model)
    ds_config = load_deepspeed_config(args, world) if args.deepspeed else None
    opt = make_optimizer(args, model, ds_config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    run = Run(args, rank, world, device, say, train_blocks, eval_blocks, config, model, opt,
              sched, n_params=sum(p.numel() for p in model.parameters()), train_model=model)
    wrap(run, ds_config)
    run.use_bf16 = args.bf16 == "on" or (args.bf16 == "auto" and device.type == "cuda"
                                         and torch.cuda.is_bf16_supported())
    return run


def wrap(run: Run, ds_config) -> None:
    """Hand the model to DeepSpeed (``ds_config`` given) or to DDP (several ranks)."""
    if ds_config is not None:
        from .zero import initialize
        try:
            run.engine, _, _, run.sched = initialize(model=run.model, optimizer=run.opt,
                                                     lr_scheduler=run.sched, config=ds_config)
        except ValueError as err:
            raise UsageError(f"--deepspeed {run.args.deepspeed}: {err}") from None
        run.train_model = run.engine
    elif run.world > 1:
        device = run.device
        run.train_model = torch.nn.parallel.DistributedDataParallel(
            run.model, device_ids=[device.index] if device.type == "cuda" else None)
