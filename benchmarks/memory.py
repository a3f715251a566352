"""Optimizer-state bytes for the LLaMA shapes of the GaLore paper, counted exactly.

How it counts: the model is built with ``transformers.LlamaForCausalLM`` on the **meta device**
(real shapes, no memory), the optimizer is given the GaLore split (``slimopt.param_groups``:
attention/MLP projections low-rank, embeddings, lm_head and norms dense) and its state is
allocated by the library's own code -- slimopt's ``init_state()``, or one ``step()`` with meta
gradients for the peers -- then ``slimopt.state_bytes`` adds up ``numel * element_size`` of every
tensor the optimizer holds (including the projection matrix inside galore-torch's and
apollo-torch's projector objects). Weights are float32, as in the papers' tables.
apollo-torch draws its random projection with a generator that the meta device does not have;
that one call is replaced by a shape-only ``torch.empty`` (the shape is unchanged).

    python benchmarks/memory.py                 # all sizes, ranks 128/256/512
    python benchmarks/memory.py --sizes 60m 1b --ranks 256 --out /tmp/mem
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from contextlib import contextmanager

import torch

import slimopt

# hidden, intermediate, heads, layers (GaLore paper, App. C); vocab 32000 (T5 tokenizer)
LLAMA_SHAPES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
from slimopt.optimizers import ROOT, SNSM, SubsetNorm  # noqa: E402

#: name -> (class, takes a rank, param_groups options); SN-SM includes lm_head as its paper does
SLIMOPT = {"GaLore (slimopt)": (slimopt.GaLore, True, {}), "SARA": (slimopt.SARA, True, {}),
           "GrassWalk": (slimopt.GrassWalk, True, {}), "GrassJump": (slimopt.GrassJump, True, {}),
           "SNSM": (SNSM, True, {"include_head": True}),
           "SubsetNorm (AdamSN)": (SubsetNorm, False, {"include_head": True}),
           "ROOT": (ROOT, False, {})}


def llama_on_meta(size: str):
    import transformers
    hidden, inter, heads, layers = LLAMA_SHAPES[size]
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden,
                                      intermediate_size=inter, num_attention_heads=heads,
                                      num_key_value_heads=heads, num_hidden_layers=layers,
                                      tie_word_embeddings=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


@contextmanager
def _apollo_meta_draws():
    import apollo_torch.random_projector as rp
    original = rp.stable_randn

    def shape_only(shape, seed, device=None, dtype=torch.float32):
        return torch.empty(shape, device=device, dtype=dtype)
    rp.stable_randn = shape_only
    try:
        yield
    finally:
        rp.stable_randn = original


def _step_on_meta(opt, model):
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()


def peer_bytes(name: str, model, rank: int) -> int | None:
    """State bytes of a peer optimizer; None when its package is not installed."""
    low, dense = slimopt.param_groups(model, rank=rank)
    dense = {"params": dense["params"]}  # the peers treat any group with a "rank" key as low-rank
    if name == "AdamW (torch)":
        opt = torch.optim.AdamW(model.parameters(), foreach=False)
        _step_on_meta(opt, model)
        return slimopt.state_bytes(opt)
    try:
        if name == "GaLoreAdamW (galore-torch)":
            from galore_torch import GaLoreAdamW
            opt = GaLoreAdamW([dict(low, update_proj_gap=200, scale=0.25, proj_type="std"),
                               dense], lr=1e-3, no_deprecation_warning=True)
            _step_on_meta(opt, model)
            return slimopt.state_bytes(opt)
        import apollo_torch
    except ImportError:
        return None
    mini = name.startswith("APOLLO-Mini")
    group = dict(low, rank=1 if mini else rank, proj="random", proj_type="std",
                 scale_type="tensor" if mini else "channel", scale=128 if mini else 1,
                 update_proj_gap=200)
    opt = apollo_torch.APOLLOAdamW([group, dense], lr=1e-3)
    with _apollo_meta_draws():
        _step_on_meta(opt, model)
    return slimopt.state_bytes(opt)


def slimopt_bytes(cls, model, rank: int | None, **group_options) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank >= hidden on the 60M model: dense, as intended
        opt = cls(slimopt.param_groups(model, rank=rank, **group_options), lr=1e-3)
    opt.init_state()
    return slimopt.state_bytes(opt)


PEERS = ["AdamW (torch)", "GaLoreAdamW (galore-torch)", "APOLLO (apollo-torch)",
         "APOLLO-Mini (apollo-torch)"]


def measure(sizes, ranks, progress=print):
    rows = []
    for size in sizes:
        model = llama_on_meta(size)
        n_params = sum(p.numel() for p in model.parameters())
        progress(f"[memory] {size}: {n_params / 1e6:.1f}M parameters")
        rows.append(dict(model=size, optimizer="AdamW (torch)", rank=None,
                         bytes=peer_bytes("AdamW (torch)", model, 0), params=n_params))
        rows.append(dict(model=size, optimizer="APOLLO-Mini (apollo-torch)", rank=1,
                         bytes=peer_bytes("APOLLO-Mini (apollo-torch)", model, 1),
                         params=n_params))
        for name, (cls, ranked, options) in SLIMOPT.items():
            if not ranked:
                rows.append(dict(model=size, optimizer=name, rank=None,
                                 bytes=slimopt_bytes(cls, model, None, **options),
                                 params=n_params))
        for rank in ranks:
            for name in PEERS[1:3]:
                rows.append(dict(model=size, optimizer=name, rank=rank,
                                 bytes=peer_bytes(name, model, rank), params=n_params))
            for name, (cls, ranked, options) in SLIMOPT.items():
                if ranked:
                    rows.append(dict(model=size, optimizer=name, rank=rank,
                                     bytes=slimopt_bytes(cls, model, rank, **options),
                                     params=n_params))
            progress(f"[memory] {size} rank {rank}: done")
    return rows


def _fmt(b):
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def markdown(rows, sizes) -> str:
    adamw = {r["model"]: r["bytes"] for r in rows if r["optimizer"] == "AdamW (torch)"}
    keys = []
    for r in rows:
        k = (r["optimizer"], r["rank"])
        if k not in keys:
            keys.append(k)
    head = "| optimizer | rank | " + " | ".join(sizes) + " |"
    lines = [head, "|" + "---|" * (len(sizes) + 2)]
    order = PEERS + list(SLIMOPT)
    for name, rank in sorted(keys, key=lambda k: (k[1] or 0, order.index(k[0]))):
        cells = []
        for size in sizes:
            b = next((r["bytes"] for r in rows if r["model"] == size and r["optimizer"] == name
                      and r["rank"] == rank), None)
            ratio = f" ({b / adamw[size]:.0%})" if b is not None and adamw.get(size) else ""
            cells.append(_fmt(b) + ratio)
        lines.append(f"| {name} | {rank if rank is not None else '-'} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(LLAMA_SHAPES),
                        choices=list(LLAMA_SHAPES))
    parser.add_argument("--ranks", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"),
                        help="folder for memory.md and memory.json")
    args = parser.parse_args(argv)
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks must be >= 1, got {args.ranks}")
    rows = measure(args.sizes, args.ranks, progress=lambda s: print(s, file=sys.stderr))
    table = markdown(rows, args.sizes)
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with open(os.path.join(args.out, "memory.md"), "w") as f:
        f.write(f"Optimizer-state bytes, float32, counted on the meta device "
                f"(percent of torch AdamW). Command: `{command.strip()}`\n\n{table}\n")
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump({"command": command.strip(), "rows": rows}, f, indent=1)
    print(table)
    return rows


if __name__ == "__main__":
    main()
