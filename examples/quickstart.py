"""A short real pretraining run: a tiny LLaMA learns Python source, slimopt next to AdamW.

The corpus is the Python standard library's own source (read from the running interpreter, so it
works offline on any machine), modelled byte by byte (vocabulary 256, no tokenizer to train).
Both optimizers see the same batches; the script prints the training loss as it goes, then the
held-out loss, perplexity and optimizer-state bytes of each.

    python examples/quickstart.py                        # GrassWalk vs AdamW, ~1 minute on 2 cores
    python examples/quickstart.py --optimizer grassjump --steps 300 --rank 32
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

import slimopt
from slimopt.launch import OPTIMIZERS, build_optimizer
from slimopt.launch.data import open_corpus
from slimopt.launch.registry import RANKED


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes (UTF-8) of the standard library's .py files, in a fixed order: the
    same documents ``slimopt-pretrain`` uses as its default corpus."""
    text = "".join(open_corpus(None, max_chars=limit).documents()).encode("utf-8")[:limit]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8)


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq] for s in starts.tolist()]).long()


def tiny_llama(seed: int):
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config)


@torch.no_grad()
def evaluate(model, data, batch, seq):
    model.eval()
    losses = [model(input_ids=ids, labels=ids).loss.item()
              for ids in batches(data, 8, batch, seq, seed=12345)]
    model.train()
    return sum(losses) / len(losses)


def train(name, args, train_data, eval_data):
    model = tiny_llama(args.seed)
    options = {"update_interval": args.interval} if name in RANKED else {}
    lr = args.lr if name != "adamw" else args.adamw_lr
    opt = build_optimizer(name, model, lr=lr, rank=args.rank, **options)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    start, tokens = time.time(), 0
    for step, ids in enumerate(batches(train_data, args.steps, args.batch, args.seq, args.seed)):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        tokens += ids.numel()
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"  [{name}] step {step:4d}  loss {loss.item():.3f}  "
                  f"{tokens / (time.time() - start):,.0f} tok/s", flush=True)
    eval_loss = evaluate(model, eval_data, args.batch, args.seq)
    return dict(name=name, eval_loss=eval_loss, ppl=math.exp(eval_loss),
                state_bytes=slimopt.state_bytes(opt), seconds=time.time() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description="Tiny LLaMA on the Python stdlib: slimopt vs AdamW")
    p.add_argument("--optimizer", default="grasswalk", choices=sorted(OPTIMIZERS) + ["adamw"])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--interval", type=int, default=50, help="update_interval")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--no-adamw", action="store_true", help="skip the AdamW comparison run")
    args = p.parse_args(argv)
    for flag in ("steps", "rank", "interval", "batch", "seq", "warmup", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    data = stdlib_bytes(4_000_000)
    split = int(0.95 * len(data))
    train_data, eval_data = data[:split], data[split:]
    print(f"corpus: {len(data):,} bytes of Python stdlib source "
          f"({sys.version.split()[0]}), held-out {len(eval_data):,}")
    results = [train(args.optimizer, args, train_data, eval_data)]
    if not args.no_adamw and args.optimizer != "adamw":
        results.append(train("adamw", args, train_data, eval_data))
    print(f"\n{'optimizer':<10} {'eval loss':>9} {'eval ppl':>9} {'state bytes':>12} {'time':>7}")
    for r in results:
        print(f"{r['name']:<10} {r['eval_loss']:9.3f} {r['ppl']:9.2f} {r['state_bytes']:12,d} "
              f"{r['seconds']:6.0f}s")
    if len(results) == 2:
        print(f"\n{args.optimizer} holds {results[0]['state_bytes'] / results[1]['state_bytes']:.0%}"
              f" of AdamW's optimizer-state bytes.")
    return results


if __name__ == "__main__":
    main()
