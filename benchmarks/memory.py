"""Optimizer-state bytes for the GaLore paper's LLaMA shapes, counted exactly, for every optimizer
slimopt has and every peer it is compared with, and per rank under FSDP2.

    python -m benchmarks memory                      # sizes 60m-7b, ranks 128/256/512, worlds 1-512
    python -m benchmarks memory --quick              # 60m and 130m, rank 128 (under a minute)
    python -m benchmarks memory --memory-sizes 60m 1b --memory-ranks 256 --memory-world-sizes 1 4
    python benchmarks/memory.py [same options]       # the same, without the other suites

How it counts: the model is ``transformers.LlamaForCausalLM`` built on the **meta device** (real
shapes, no memory). Each optimizer is built the way the launcher builds it
(``slimopt.launch.registry.build_optimizer``: slimopt's optimizers get ``slimopt.param_groups``,
the GaLore split, with lm_head in the matrix group for SNSM, SubspaceMomentum and SubsetNorm as
their papers do; the peers come from ``slimopt.launch.peers``). Its state is allocated by the
library's own code -- slimopt's ``init_state()``, or one ``step()`` with meta gradients for the
peers -- and ``slimopt.state_bytes`` adds up ``numel * element_size`` of every tensor the
optimizer holds (including the projection matrices inside galore-torch's, fira's and
apollo-torch's projector objects). Weights and state are float32, as in the papers' tables.
Every state tensor with more than one element is checked to be on the meta device, i.e. really
allocated by the optimizer for these shapes; the only tensors elsewhere are torch AdamW's
0-dim ``step`` counters, which torch keeps on the CPU (4 bytes each, counted). Since nothing is
computed on a real device, the numbers are the same on any machine; they live under
``benchmarks/results/cpu/``.

Two library calls cannot run on meta tensors and are replaced, for the duration of the count, by
shape-only stand-ins (nothing in the state depends on them):

* apollo-torch draws its random projection with a generator that the meta device does not have:
  ``stable_randn`` becomes ``torch.empty`` of the same shape;
* torch-optimizer's Adafactor clips its update with ``max(1.0, rms(update) / threshold)``, a
  Python comparison (``.item()``) made after its state is allocated: on meta tensors that
  ``max`` returns 1.0.

torch's Muon accepts only matrices, so its row is Muon on the projections plus AdamW on the rest
(``peers.torch_muon_with_adamw``). Fused AdamW holds the same tensors as foreach AdamW (and
refuses meta tensors), so it has no row. APOLLO-Mini is rank 1 whatever ``--memory-ranks`` says.
AdaPreLoRA (LoRA fine-tuning) is not a pretraining optimizer and is not counted here.

Per rank under FSDP2 (``torch.distributed.fsdp.fully_shard``; LLaMA 1b at rank 256 and 7b at
rank 1024, the launcher's 7b preset rank, when those sizes are asked for, else the largest size
at the rank nearest 256; world sizes default 1 2 4 8 64 512). The table **is** the planner the
runs use, not a separate model of it: for each of slimopt's optimizers, built on the meta device
as above, ``slimopt.distributed.fsdp.plan(optimizer, world).per_rank`` gives the state bytes
of every rank (element-wise parameters keep their state on the rows each rank holds,
``owners.row_shares``; each matrix goes whole to an owner, largest state first to the least
loaded rank, ``owners.assign_owners``). A 4-rank FSDP2 test measures per-rank state equal to the
plan. ZeRO-1/2/3 under slimopt's DeepSpeed bridge use the same owner planning; their numbers are
not in this table.

* torch AdamW under FSDP2: its two fp32 moments are DTensors split like the parameters, so a
  rank holds ``8 * row_shares(shape)[rank]`` bytes of each parameter, plus the 4-byte ``step``
  counter of every parameter, which every rank keeps (at world 1 this is the count above).
* Cells: the largest rank's bytes, its ratio to AdamW's largest rank at the same world size, and
  max/mean over the ranks (1.00x: perfectly balanced). A matrix's state is indivisible, so once
  the mean share falls below the largest matrix's state (lm_head or the embedding's at hundreds
  of ranks) the largest rank is that matrix and max/mean grows with the world size.
* Not counted: the fp32 (or 16-bit) parameter shards and gradients, and the transient buffers of
  an owner's step (one whole matrix's values and gradient at a time).
Only slimopt's optimizers and AdamW are in this table: the peers have no FSDP2 planning.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from contextlib import contextmanager

import torch

if __package__ in (None, ""):  # run as a script: make the ``benchmarks`` package importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import slimopt  # noqa: E402
from slimopt.launch import records  # noqa: E402
from slimopt.launch.registry import OPTIMIZERS, RANKED, build_optimizer  # noqa: E402
from slimopt.distributed.fsdp import plan  # noqa: E402
from slimopt.distributed.owners import row_shares  # noqa: E402

from benchmarks import report  # noqa: E402

# hidden, intermediate, heads, layers (GaLore paper, App. C); vocab 32000 (T5 tokenizer)
LLAMA_SHAPES = {
    "60m": (512, 1376, 8, 8),
    "130m": (768, 2048, 12, 12),
    "350m": (1024, 2736, 16, 24),
    "1b": (2048, 5461, 32, 24),
    "7b": (4096, 11008, 32, 32),
}
SIZES, RANKS, WORLD_SIZES = list(LLAMA_SHAPES), [128, 256, 512], [1, 2, 4, 8, 64, 512]
QUICK_SIZES, QUICK_RANKS = ["60m", "130m"], [128]
#: the FSDP2 per-rank tables' models and ranks (7b: the launcher's preset rank), for those sizes
#: among the sizes asked for
PER_RANK = {"1b": 256, "7b": 1024}

#: display name -> launcher name, from the method records (``slimopt.launch.records``);
#: slimopt's own GaLore is "galore-slimopt" there, galore-torch's is the peer "galore"
SLIMOPT = {m.display: m.name for m in records.in_suite(records.MEMORY) if not m.is_peer}
PEERS = {m.display: m.name for m in records.in_suite(records.MEMORY) if m.is_peer}
ORDER = list(PEERS) + list(SLIMOPT)
ADAMW = "AdamW (torch)"
#: peers whose rank is fixed by their recipe
FIXED_RANK = {m.name: m.fixed_rank for m in records.METHODS if m.fixed_rank is not None}


def llama_on_meta(size: str):
    import transformers
    hidden, inter, heads, layers = LLAMA_SHAPES[size]
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden,
                                      intermediate_size=inter, num_attention_heads=heads,
                                      num_key_value_heads=heads, num_hidden_layers=layers,
                                      tie_word_embeddings=False)
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def _first_not_meta(*args):
    """``max`` for torch-optimizer's Adafactor on meta tensors: the Python number it compares
    with (the clipping divisor becomes 1.0); the builtin ``max`` when no meta tensor is given."""
    if any(torch.is_tensor(a) and a.is_meta for a in args):
        return next((a for a in args if not torch.is_tensor(a)), args[0])
    return max(*args)


@contextmanager
def _meta_patches():
    """The two shape-only stand-ins of the module docstring, undone on exit."""
    undo = []
    try:
        import apollo_torch.random_projector as rp
    except ImportError:
        rp = None
    if rp is not None:
        original = rp.stable_randn

        def shape_only(shape, seed, device=None, dtype=torch.float32):
            return torch.empty(shape, device=device, dtype=dtype)
        rp.stable_randn = shape_only
        undo.append(lambda: setattr(rp, "stable_randn", original))
    try:
        import torch_optimizer.adafactor as af
    except ImportError:
        af = None
    if af is not None and "max" not in vars(af):
        af.max = _first_not_meta  # module global: shadows the builtin inside that module only
        undo.append(lambda: delattr(af, "max"))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def _step_on_meta(opt, model):
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()


def _state_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _state_tensors(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _state_tensors(v)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from _state_tensors(v)


def build_on_meta(key: str, model, rank: int | None):
    """The optimizer the launcher builds for ``key``, with its state allocated on meta tensors.
    Raises ``ValueError`` (from ``slimopt.launch.peers``) when a peer's package is missing and
    ``RuntimeError`` when a state tensor (other than a scalar) is not on the meta device."""
    with warnings.catch_warnings():
        # rank >= hidden on the 60M model: slimopt falls back to dense, as intended; the peers'
        # deprecation warnings
        warnings.simplefilter("ignore")
        opt = build_optimizer(key, model, lr=1e-3, rank=rank)
        if key in OPTIMIZERS:
            opt.init_state()
        else:
            with _meta_patches():
                _step_on_meta(opt, model)
    for t in _state_tensors(opt.state):
        if t.numel() > 1 and not t.is_meta:
            raise RuntimeError(f"memory benchmark: {key} holds a {tuple(t.shape)} state tensor "
                               f"on {t.device}, not on the meta device")
    return opt


def _rank_of(key: str, rank: int):
    return FIXED_RANK.get(key, rank if key in RANKED else None)


def _keys_and_ranks(ranks):
    """(display name, launcher name, rank or None) for every row of one model size."""
    out = []
    for name in ORDER:
        key = PEERS.get(name) or SLIMOPT[name]
        if key in RANKED and key not in FIXED_RANK:
            out += [(name, key, r) for r in ranks]
        else:
            out.append((name, key, _rank_of(key, 0)))
    return out


def measure(sizes, ranks, progress=print) -> list[dict]:
    """One row per (model size, optimizer, rank): state bytes (None when a peer's package is
    missing) and the model's parameter count."""
    rows = []
    for size in sizes:
        t0 = time.time()
        model = llama_on_meta(size)
        n_params = sum(p.numel() for p in model.parameters())
        for name, key, rank in _keys_and_ranks(ranks):
            try:
                b = slimopt.state_bytes(build_on_meta(key, model, rank))
            except ValueError as err:  # a peer's package is not installed
                progress(f"[memory] {name}: {err}")
                b = None
            rows.append(dict(model=size, optimizer=name, key=key,
                             library="slimopt" if name in SLIMOPT else "peer", rank=rank,
                             bytes=b, params=n_params))
        progress(f"[memory] {size} ({n_params / 1e6:.1f}M parameters): "
                 f"{len(_keys_and_ranks(ranks))} optimizers in {time.time() - t0:.1f} s")
    return rows


def adamw_per_rank(model, world: int) -> list[int]:
    """torch AdamW's state bytes on each rank under FSDP2: its two fp32 moments are split like
    the parameters (``row_shares``), and every rank keeps the 4-byte ``step`` of each parameter."""
    params = list(model.parameters())
    state = [4 * len(params)] * world
    for p in params:
        for r, share in enumerate(row_shares(tuple(p.shape), world)):
            state[r] += 8 * share
    return state


def _balance(state) -> float:
    """max / mean over the ranks (1.0: balanced)."""
    mean = sum(state) / len(state)
    return max(state) / mean if mean else 1.0


def fsdp_table(size: str, rank: int, worlds, progress=print) -> list[dict]:
    """One row per (optimizer, world size): every rank's state bytes under FSDP2, from
    ``slimopt.distributed.fsdp.plan`` for slimopt's optimizers (the planner the runs use) and
    ``adamw_per_rank`` for torch AdamW (see the module docstring)."""
    t0 = time.time()
    model = llama_on_meta(size)
    rows = []

    def row(name, rank_, state, scheme):
        return dict(model=size, optimizer=name, rank=rank_, world=len(state), scheme=scheme,
                    total=sum(state), state_max=max(state), state_mean=sum(state) / len(state),
                    balance=_balance(state), state_per_rank=state)
    for world in worlds:
        rows.append(row(ADAMW, None, adamw_per_rank(model, world),
                        "torch AdamW under FSDP2 (moments split by rows)"))
    for name, key in SLIMOPT.items():
        opt = build_on_meta(key, model, _rank_of(key, rank))
        for world in worlds:
            rows.append(row(name, _rank_of(key, rank), list(plan(opt, world).per_rank),
                            "slimopt.distributed.fsdp.plan"))
    adamw = {r["world"]: r["state_max"] for r in rows if r["optimizer"] == ADAMW}
    for r in rows:
        r["vs_adamw"] = r["state_max"] / adamw[r["world"]]
    progress(f"[memory] FSDP2 per-rank table: {size}, rank {rank}, world sizes "
             f"{' '.join(map(str, worlds))} in {time.time() - t0:.1f} s")
    return rows


def per_rank_configs(sizes, ranks) -> list[tuple[str, int]]:
    """The per-rank tables' (model, rank): those of ``PER_RANK`` among ``sizes`` (1b at 256, 7b
    at 1024), else the largest size at the rank of ``ranks`` nearest 256."""
    chosen = [(size, rank) for size, rank in PER_RANK.items() if size in sizes]
    if chosen:
        return chosen
    largest = max(sizes, key=list(LLAMA_SHAPES).index)
    return [(largest, min(ranks, key=lambda r: (abs(r - 256), r)))]


def collect(sizes, ranks, worlds, progress=print) -> dict:
    rows = measure(sizes, ranks, progress)
    tables = [dict(model=size, rank=rank, rows=fsdp_table(size, rank, worlds, progress))
              for size, rank in per_rank_configs(sizes, ranks)]
    return dict(sizes=list(sizes), ranks=list(ranks), world_sizes=list(worlds), rows=rows,
                per_rank=tables)


# ------------------------------------------------------------------------------ tables, figure
def _fmt(b):
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _pct(x):
    return f"{x:.2%}" if x < 0.001 else f"{x:.1%}" if x < 0.095 else f"{x:.0%}"


def _row_order(k):
    name, rank = k
    return (rank or 0, ORDER.index(name))


def markdown(data: dict) -> str:
    rows, sizes = data["rows"], data["sizes"]
    adamw = {r["model"]: r["bytes"] for r in rows if r["optimizer"] == ADAMW}
    keys = list(dict.fromkeys((r["optimizer"], r["rank"]) for r in rows))
    lines = ["## Optimizer-state bytes (percent of torch AdamW)", "",
             "Float32 weights and state of `transformers.LlamaForCausalLM` at the GaLore paper's "
             "shapes (vocab 32000), allocated by each library's own code on the **meta device** "
             "and counted with `slimopt.state_bytes`: exact, and the same on any device (the "
             "file sits under `cpu/` for that reason). slimopt's optimizers use the GaLore split "
             "(projections: the method's matrix rule; embeddings, lm_head, norms: AdamW; SNSM, "
             "SubspaceMomentum and SubsetNorm put lm_head in the matrix group). Muon is torch's "
             "Muon on the projections plus AdamW on the rest; Adafactor (torch-optimizer, "
             "`beta1=None` as in `slimopt.launch.peers`) keeps no first moment and a factored "
             "second moment on every matrix; APOLLO-Mini is rank 1. Method and the two "
             "shape-only stand-ins (apollo-torch's random draw, Adafactor's update clipping): "
             "`benchmarks/memory.py`'s docstring.", "",
             "| optimizer | rank | " + " | ".join(sizes) + " |",
             "|" + "---|" * (len(sizes) + 2)]
    for name, rank in sorted(keys, key=_row_order):
        cells = []
        for size in sizes:
            b = next((r["bytes"] for r in rows if r["model"] == size and r["optimizer"] == name
                      and r["rank"] == rank), None)
            ratio = f" ({_pct(b / adamw[size])})" if b is not None and adamw.get(size) else ""
            cells.append(_fmt(b) + ratio)
        lines.append(f"| {name} | {rank if rank is not None else '-'} | " + " | ".join(cells)
                     + " |")
    for table in data["per_rank"]:
        lines += [""] + per_rank_markdown(table, data["world_sizes"])
    return "\n".join(lines)


def per_rank_markdown(table: dict, worlds) -> list[str]:
    """The lines of one FSDP2 per-rank table (a ``collect`` ``per_rank`` entry)."""
    rows = table["rows"]
    lines = [f"## Per-rank state under FSDP2: LLaMA {table['model']}, rank {table['rank']}", "",
             "Computed by the planner the runs use, `slimopt.distributed.fsdp.plan(optimizer, "
             "world).per_rank`, on the optimizers above (meta device): element-wise parameters "
             "keep their state on the rows each rank holds, each matrix goes whole to one owner "
             "(largest state first, to the least loaded rank); a 4-rank FSDP2 test measures "
             "exactly these bytes. ZeRO-1/2/3 under slimopt's DeepSpeed bridge use the same owner "
             "planning. torch AdamW under FSDP2: its two fp32 moments split by rows like the "
             "parameters, plus a 4-byte `step` per parameter on every rank. Cells: the largest "
             "rank's bytes (its ratio to AdamW's largest rank at the same world size; max/mean "
             "over the ranks). Not counted: parameter and gradient shards, and an owner's "
             "transient whole matrix during its step.", "",
             "| optimizer | rank | " + " | ".join(f"world {w}" for w in worlds) + " |",
             "|" + "---|" * (len(worlds) + 2)]
    for name in [ADAMW] + list(SLIMOPT):
        mine = {r["world"]: r for r in rows if r["optimizer"] == name}
        if not mine:
            continue
        rank = mine[worlds[0]]["rank"]
        cells = [f"{_fmt(mine[w]['state_max'])} ({_pct(mine[w]['vs_adamw'])}; "
                 f"{mine[w]['balance']:.2f}x)" for w in worlds]
        lines.append(f"| {name} | {rank if rank is not None else '-'} | " + " | ".join(cells)
                     + " |")
    return lines


def figure(data: dict):
    plt = report.pyplot()
    if plt is None:
        return None
    table = data["per_rank"][0]
    size, table_rank = table["model"], table["rank"]
    rank = min(data["ranks"], key=lambda r: (abs(r - table_rank), r))  # the counted rank nearest
    rows = [r for r in data["rows"] if r["model"] == size and r["bytes"] is not None
            and (r["rank"] in (None, rank) or r["key"] in FIXED_RANK)]
    adamw = next(r["bytes"] for r in rows if r["optimizer"] == ADAMW)
    rows.sort(key=lambda r: r["bytes"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    colours = {"slimopt": "tab:blue", "peer": "tab:orange"}
    labels = [r["optimizer"] + (f", r={r['rank']}" if r["rank"] else "") for r in rows]
    pct = [100 * r["bytes"] / adamw for r in rows]
    left.barh(range(len(rows)), pct, color=[colours[r["library"]] for r in rows])
    left.set_yticks(range(len(rows)), labels, fontsize=8)
    for i, v in enumerate(pct):
        left.text(v + 1, i, _pct(v / 100), va="center", fontsize=7)
    left.axvline(100, color="grey", lw=0.8, ls=":")
    left.set_xlabel("optimizer-state bytes, % of torch AdamW")
    left.set_title(f"LLaMA {size}, float32 (rank {rank} where it applies)")
    left.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()],
                labels=["slimopt", "peer"], loc="lower right", fontsize=8)
    worlds = data["world_sizes"]
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # 7: grey
    markers = "os^vD<>p"
    for i, name in enumerate([ADAMW] + list(SLIMOPT)):
        mine = {r["world"]: r for r in table["rows"] if r["optimizer"] == name}
        if not mine:
            continue
        colour = "black" if name == ADAMW else palette[(i - 1) % len(palette)]
        right.plot(worlds, [mine[w]["state_max"] / 2**30 for w in worlds],
                   marker="o" if name == ADAMW else markers[(i - 1) % len(markers)],
                   color=colour, lw=2 if name == ADAMW else 1.2, ms=5,
                   label=name + (" (moments split by rows)" if name == ADAMW else ""))
    right.set_xscale("log", base=2)
    right.set_yscale("log")
    right.set_xticks(worlds, [str(w) for w in worlds])
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    right.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    right.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    right.yaxis.set_minor_formatter(NullFormatter())
    right.set_xlabel("FSDP2 world size")
    right.set_ylabel("GiB on the largest rank")
    right.set_title(f"Per-rank optimizer state under FSDP2 (fsdp.plan), LLaMA {size}, "
                    f"rank {table_rank}")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ suite interface
def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_arguments(group) -> None:
    group.add_argument("--memory-sizes", nargs="+", choices=list(LLAMA_SHAPES), default=None,
                       help=f"LLaMA sizes (default {' '.join(SIZES)}; --quick: "
                            f"{' '.join(QUICK_SIZES)})")
    group.add_argument("--memory-ranks", nargs="+", type=_positive_int, default=None,
                       help=f"ranks of the low-rank methods (default {' '.join(map(str, RANKS))};"
                            f" --quick: {' '.join(map(str, QUICK_RANKS))})")
    group.add_argument("--memory-world-sizes", nargs="+", type=_positive_int, default=None,
                       help=f"FSDP2 world sizes of the per-rank tables (default "
                            f"{' '.join(map(str, WORLD_SIZES))}); their models are 1b (rank 256) "
                            f"and 7b (rank 1024) if among the sizes, else the largest size at "
                            f"the rank nearest 256")


def settings(args) -> tuple[list[str], list[int], list[int]]:
    """(sizes, ranks, world sizes) from the parsed options: the ones given, else the defaults
    (``--quick``: fewer sizes and ranks), sorted and without repeats."""
    quick = getattr(args, "quick", False)
    sizes = getattr(args, "memory_sizes", None) or (QUICK_SIZES if quick else SIZES)
    ranks = getattr(args, "memory_ranks", None) or (QUICK_RANKS if quick else RANKS)
    worlds = getattr(args, "memory_world_sizes", None) or WORLD_SIZES
    return (sorted(dict.fromkeys(sizes), key=list(LLAMA_SHAPES).index), sorted(set(ranks)),
            sorted(set(worlds)))


def run(args, folder: str, info: dict) -> list[str]:
    """Count, then write ``memory.json``, ``memory.md`` and ``memory.png`` into ``folder``."""
    sizes, ranks, worlds = settings(args)
    data = collect(sizes, ranks, worlds, progress=lambda s: print(s, file=sys.stderr))
    return report.write(folder, "memory", info, data, markdown(data), figure(data))


def main(argv=None) -> dict:
    """``python benchmarks/memory.py [--quick] [--out DIR] [--memory-...]``: the memory suite
    alone (the same code as ``python -m benchmarks memory``). Returns the data written."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60m and 130m, rank 128")
    parser.add_argument("--out", default=None,
                        help="results base folder (default benchmarks/results); files go to "
                             "OUT/cpu/")
    add_arguments(parser)
    args = parser.parse_args(argv)
    folder = report.out_dir("cpu", args.out)
    info = report.stamp("cpu", ["memory"] + argv)
    info["command"] = ("python benchmarks/memory.py " + " ".join(argv)).strip()
    paths = run(args, folder, info)
    print(f"[memory] wrote {', '.join(paths)}", file=sys.stderr)
    with open(paths[1]) as f:
        print(f.read())
    with open(paths[0]) as f:
        return json.load(f)["data"]


if __name__ == "__main__":
    main()
