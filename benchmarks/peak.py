"""Peak memory of real training steps (forward, backward, optimizer step) of a LLaMA preset, one
fresh process per configuration, as a ratio to torch AdamW (``foreach=False``) in the same run.

    python -m benchmarks peak                    # CPU: LLaMA-350M, micro-batch 1 x 256, 2 steps
    python -m benchmarks peak --quick            # the small preset, 4 configurations, ~2 min
    python -m benchmarks peak --device cuda      # adds torch.cuda.max_memory_allocated
    python -m benchmarks peak --peak-configs adamw grassjump grassjump-lean --peak-preset 60m
    python -m benchmarks peak --peak-configs adamw snsm-lean --peak-merge OUT/cpu/peak.json

What runs: each configuration is a child process (``python -c`` calling ``worker`` below, with
``OMP_NUM_THREADS`` and torch's threads set to ``--peak-threads``, default 2). The child imports
what the configuration needs (torch, transformers, slimopt, the peer's package), builds
``transformers.LlamaForCausalLM`` with the preset's shape (``slimopt.launch.presets``; vocab
32000 for the GaLore sizes, the preset's own for tiny/small), float32 weights initialized by
transformers on the device (nothing is downloaded), its optimizer the way ``slimopt-pretrain``
builds it (``slimopt.launch.registry.build_optimizer``: the GaLore split, the preset's rank),
and runs ``--peak-steps`` (default 2, so the optimizer state exists during the last step's
forward and backward) training steps on random token ids (``labels = input_ids``):
``loss.backward()``, ``opt.step()``, ``opt.zero_grad(set_to_none=True)``.

What is reported, per configuration:

- **peak RSS**: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child (the
  process's high-water mark, imports and model construction included);
- **import baseline**: the RSS (``VmRSS``) after the imports and one forward and backward of a
  toy model (``_warm_up``: transformers imports its model code lazily, and torch's kernels are
  paged in at first use), before the model exists;
  **training part** = peak RSS - import baseline (weights, gradients, optimizer state,
  activations, allocator slack);
- ratios of both to torch AdamW's in the same run;
- **state bytes**: ``slimopt.state_bytes`` of the optimizer after the last step (every tensor
  in ``optimizer.state``, torchao's and bitsandbytes' 8-bit tensors by what they store); for
  GaLore's per-layer mode the sum over its per-parameter optimizers;
- on CUDA, ``torch.cuda.max_memory_allocated`` (tensors only, from the start of the child).

Configurations (``--peak-configs``; default: all): ``adamw`` (torch, ``foreach=False``, the
reference), ``adamw8bit-bnb`` (bitsandbytes' ``AdamW8bit``), ``adamw8bit-torchao`` (torchao's
``AdamW8bit``, which compiles its step with ``torch.compile`` on first use), ``galore-torch``
(``GaLoreAdamW``, the launcher's peer), ``galore-torch-8bit-layerwise`` (GaLore's own
per-layer recipe from its ``torchrun_main.py``: ``GaLoreAdamW8bit`` for the projections and
bitsandbytes' ``Adam8bit`` for the rest, one optimizer per parameter stepped from a
post-accumulate-grad hook), and each of slimopt's pretraining optimizers plain (``NAME``) and
**lean** (``NAME-lean``): ``slimopt.step_in_backward(optimizer)`` (each parameter steps during
backward and its gradient is freed at once) with ``state_dtype="int8"`` (``--peak-lean-state``)
when the optimizer takes one. A configuration that cannot run here (a package missing, CUDA
only) is a row that says why.

The glibc allocator: the children run with ``MALLOC_MMAP_THRESHOLD_=65536`` (``--peak-malloc
mmap``, the default; ``default`` leaves glibc's dynamic threshold) for every configuration: every
allocation of 64 KiB or more is its own ``mmap`` and goes back to the system when freed. With
glibc's dynamic threshold, which rises to the size of the largest block freed (up to 32 MiB),
the gradients and temporaries freed during a step stay in the heap as slack that a later
allocation may or may not reuse, so RSS measures the allocator's history as much as the tensors.

Also written (section "Computed, 1B and 7B"): weights + gradients + optimizer state +
activations for LLaMA-1B and -7B at micro-batch 1 x 256 (``computed``): state bytes counted
exactly on the meta device as in ``benchmarks/memory.py``; activations from ``activation_bytes``
(the tensors autograd saves for transformers' ``LlamaForCausalLM`` with SDPA attention, a
formula checked against a saved-tensor count in the tests), with and without activation
checkpointing; and the LLaMA-7B-on-24-GB recipe.

Writes ``peak.json``, ``peak.md`` and ``peak.png`` (rewritten after every configuration, so an
interrupted run keeps what it measured). ``--peak-merge A/peak.json [B/peak.json ...]`` keeps
earlier runs' rows (same settings required) beside this run's, each row with the ratios to the
AdamW of its own run and each run's command and commit listed: a long CPU measurement can be
split into runs that each measure AdamW again (``--peak-merge-only`` writes the merged tables
without measuring). At LLaMA-350M on 2 shared CPU cores a configuration takes
3-7 minutes (a lean one the longest: its steps go one parameter at a time).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import resource
import subprocess
import sys
import time
import warnings

from . import report

#: the children's allocator settings (module docstring)
MALLOC = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}
STEPS, BATCH, SEQ_LEN, THREADS = 2, 1, 256, 2
DEFAULT_PRESET, QUICK_PRESET = "350m", "small"
GOAL = 0.45
REFERENCE = "adamw"
#: the GaLore sizes have the T5 tokenizer's vocabulary; tiny and small their own
GALORE_VOCAB = 32000
PEERS = ("adamw", "adamw8bit-bnb", "adamw8bit-torchao", "galore-torch",
         "galore-torch-8bit-layerwise")
LEAN = "-lean"
QUICK_CONFIGS = ("adamw", "adamw8bit-bnb", "grassjump", "grassjump-lean")
#: the computed section: sizes, micro-batch, the optimizer shown as "slimopt", the GPU budget
COMPUTED_SIZES = ("1b", "7b")
COMPUTED_OPTIMIZER = "grassjump"
GPU_BYTES = 24 * 10**9
CHILD_TIMEOUT = 3600


def slimopt_names() -> list[str]:
    """slimopt's pretraining optimizers (the launcher's names, ``slimopt.launch.records``)."""
    from slimopt.launch.registry import OPTIMIZERS
    return list(OPTIMIZERS)


#: suffix of a configuration trained with activation checkpointing (not in the default list)
CKPT = "-ckpt"


def split_ckpt(config: str) -> tuple[str, bool]:
    """(the configuration without ``-ckpt``, whether it checkpoints activations)."""
    return (config[:-len(CKPT)], True) if config.endswith(CKPT) else (config, False)


def all_configs() -> list[str]:
    """Every configuration, the reference first, then the lean ones, then the rest (so that an
    interrupted run has measured what matters most)."""
    ours = slimopt_names()
    return [REFERENCE] + [n + LEAN for n in ours] + ours + [p for p in PEERS if p != REFERENCE]


def label(config: str, lean_state: str | None = None) -> str:
    """The row label of ``config``; for a lean one, with the state dtype it ran with."""
    from slimopt.launch.records import BY_NAME
    config, ckpt = split_ckpt(config)
    if ckpt:
        return label(config, lean_state) + " + activation checkpointing"
    peers = {"adamw": "AdamW (torch, foreach=False)",
             "adamw8bit-bnb": "AdamW8bit (bitsandbytes)",
             "adamw8bit-torchao": "AdamW8bit (torchao)",
             "galore-torch": "GaLoreAdamW (galore-torch)",
             "galore-torch-8bit-layerwise": "GaLoreAdamW8bit per layer (galore-torch)"}
    if config in peers:
        return peers[config]
    if config.endswith(LEAN):
        base = BY_NAME[config[:-len(LEAN)]].display
        extra = f" + {lean_state} states" if lean_state and lean_state != "float32" else ""
        return f"{base} lean (in-backward{extra})"
    return BY_NAME[config].display


# ------------------------------------------------------------------------------ the child
def _rss_now() -> int:
    """This process's resident set size in bytes (``VmRSS``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _rss_peak()


def _rss_peak() -> int:
    """This process's peak RSS in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _say(message: str) -> None:
    print(f"[peak:child] {message}", file=sys.stderr, flush=True)


def _model_config(preset: str, seq_len: int):
    from slimopt.launch.presets import PRESETS, llama_config
    vocab = PRESETS[preset][1]["vocab_size"]
    config = llama_config(preset, vocab, seq_len)
    config.use_cache = False
    return config


def _galore_layerwise(model, rank: int, update_interval: int, lr: float):
    """GaLore's per-layer 8-bit recipe (``torchrun_main.py``, ``--optimizer
    galore_adamw8bit_per_layer``): one optimizer per parameter, stepped and zeroed from a
    post-accumulate-grad hook. Returns the dict of optimizers."""
    import bitsandbytes as bnb
    from galore_torch import GaLoreAdamW8bit
    from slimopt import param_groups
    matrices = {id(p) for p in param_groups(model)[0]["params"]}
    optimizers = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if id(p) in matrices:
            optimizers[p] = GaLoreAdamW8bit([{"params": [p], "rank": rank,
                                              "update_proj_gap": update_interval * 2,
                                              "scale": 0.25, "proj_type": "std"}],
                                            lr=lr, weight_decay=0.0)
        else:
            optimizers[p] = bnb.optim.Adam8bit([p], lr=lr, weight_decay=0.0)

    def hook(p):
        if p.grad is None:
            return
        optimizers[p].step()
        optimizers[p].zero_grad()
    for p in model.parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
    return optimizers


def _probe_galore_8bit_cpu() -> str | None:
    """Why galore-torch's ``GaLoreAdamW8bit`` cannot step on the CPU (one step of a 64 x 64
    matrix), or None if it can."""
    import torch
    from galore_torch import GaLoreAdamW8bit
    p = torch.nn.Parameter(torch.randn(64, 64))
    p.grad = torch.randn(64, 64)
    opt = GaLoreAdamW8bit([{"params": [p], "rank": 8, "update_proj_gap": 10, "scale": 0.25,
                            "proj_type": "std"}], lr=1e-3)
    try:
        opt.step()
    except Exception as err:  # noqa: BLE001 -- reported as the row's reason
        return f"{type(err).__name__}: {err}"
    return None


def _imports(config: str, lean_state: str):
    """Import what ``config`` needs, before the baseline is read. Returns None, or the reason
    the configuration cannot run here."""
    import torch  # noqa: F401
    import transformers
    import slimopt  # noqa: F401
    transformers.LlamaForCausalLM, transformers.LlamaConfig  # transformers imports lazily
    try:
        if config.endswith(LEAN) and lean_state == "int8":
            import bitsandbytes.functional  # noqa: F401  -- slimopt's int8 states use it
        if config == "adamw8bit-bnb":
            import bitsandbytes  # noqa: F401
        elif config == "adamw8bit-torchao":
            import torchao.optim  # noqa: F401
        elif config == "galore-torch":
            import galore_torch  # noqa: F401
        elif config == "galore-torch-8bit-layerwise":
            import bitsandbytes  # noqa: F401
            import galore_torch  # noqa: F401
    except ImportError as err:
        package = {"adamw8bit-bnb": "bitsandbytes", "adamw8bit-torchao": "torchao",
                   "galore-torch": "galore-torch"}.get(config, "galore-torch bitsandbytes")
        return f"not installed ({err}): pip install {package}"
    return None


def _warm_up(device: str) -> None:
    """One forward and backward of a toy LlamaForCausalLM (2 layers, hidden 16, vocab 64),
    then gone: the lazy imports of transformers' model code and the first use of torch's
    kernels (their code pages) happen before the baseline is read, not inside the training
    part."""
    import torch
    import transformers
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, num_key_value_heads=2,
                                      num_hidden_layers=2, use_cache=False,
                                      tie_word_embeddings=False)
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        toy = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 64, (1, 8), device=device)
    toy(input_ids=ids, labels=ids).loss.backward()
    del toy, ids


def _lean_state_dtype(name: str, wanted: str) -> str:
    """The ``state_dtype`` optimizer ``name`` runs with in a lean configuration: ``wanted`` if it
    takes a ``state_dtype``, else "float32" (the row's label says which)."""
    from slimopt.launch.registry import OPTIMIZERS
    takes = "state_dtype" in inspect.signature(OPTIMIZERS[name]).parameters
    return wanted if takes else "float32"


def build(config: str, model, rank: int, lr: float, lean_state: str, device):
    """(optimizer or dict of per-parameter optimizers, step-in-backward handle or None, the
    state dtype of a lean configuration or None)."""
    import torch
    import slimopt
    from slimopt.launch.registry import build_optimizer, cli_defaults
    if config == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, foreach=False,
                                 weight_decay=0.0), None, None
    if config == "adamw8bit-bnb":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0), None, None
    if config == "adamw8bit-torchao":
        from torchao.optim import AdamW8bit
        return AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0), None, None
    if config == "galore-torch":
        return build_optimizer("galore", model, lr=lr, rank=rank), None, None
    if config == "galore-torch-8bit-layerwise":
        return _galore_layerwise(model, rank, 200, lr), None, None
    name = config[:-len(LEAN)] if config.endswith(LEAN) else config
    options = dict(cli_defaults(name))
    if config.endswith(LEAN):
        state = _lean_state_dtype(name, lean_state)
        if state != "float32":
            options["state_dtype"] = state
        opt = build_optimizer(name, model, lr=lr, rank=rank, **options)
        return opt, slimopt.step_in_backward(opt), state
    return build_optimizer(name, model, lr=lr, rank=rank, **options), None, None


def _state_bytes(opt) -> int:
    import slimopt
    if isinstance(opt, dict):
        return sum(slimopt.state_bytes(o) for o in opt.values())
    return slimopt.state_bytes(opt)


def measure_one(spec: dict) -> dict:
    """Run one configuration in this process (the child's work) and return its row."""
    t0 = time.time()
    device_name = spec["device"]
    row = dict(config=spec["config"], status="ok")
    config, ckpt = split_ckpt(spec["config"])
    why = _imports(config, spec["lean_state"])
    import torch
    torch.set_num_threads(spec["threads"])
    row.update(rss_after_imports=_rss_now())
    if why is None:
        _warm_up(spec["device"])
    baseline, baseline_peak = _rss_now(), _rss_peak()
    row.update(rss_imports=baseline, rss_peak_imports=baseline_peak)
    if why is None and config == "galore-torch-8bit-layerwise" and device_name == "cpu":
        reason = _probe_galore_8bit_cpu()
        if reason:
            why = ("CUDA only: galore-torch's GaLoreAdamW8bit.step calls "
                   f"torch.cuda.synchronize() after every parameter ({reason})")
    if why is not None:
        row.update(status="n/a", reason=why, label=label(spec["config"]), peak_rss=_rss_peak())
        return row
    device = torch.device(device_name)
    cuda = device.type == "cuda"
    import transformers
    torch.manual_seed(spec["seed"])
    config_ = _model_config(spec["preset"], spec["seq_len"])
    with torch.device(device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config_)
    model.train()
    if ckpt:
        from slimopt.launch.run_setup import checkpoint_activations
        checkpoint_activations(model)
    n_params = sum(p.numel() for p in model.parameters())
    row.update(params=n_params, weight_bytes=sum(p.numel() * p.element_size()
                                                 for p in model.parameters()),
               attn_implementation=model.config._attn_implementation,
               rss_model=_rss_now())
    _say(f"{config}: model {n_params / 1e6:.1f}M parameters, RSS {_rss_now() / 2**30:.2f} GiB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt, handle, lean_state = build(config, model, spec["rank"], 1e-3, spec["lean_state"],
                                        device)
    row.update(label=label(spec["config"], lean_state), state_dtype=lean_state,
               step_in_backward=handle is not None, activation_checkpointing=ckpt)
    gen = torch.Generator().manual_seed(spec["seed"] + 1)
    vocab = config_.vocab_size
    steps = []
    for step in range(spec["steps"]):
        ts = time.time()
        ids = torch.randint(0, vocab, (spec["batch"], spec["seq_len"]), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if handle is None and not isinstance(opt, dict):
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss = float(loss)
        del ids
        if cuda:
            torch.cuda.synchronize()
        steps.append(dict(loss=loss, seconds=time.time() - ts, rss=_rss_now(),
                          peak_rss=_rss_peak()))
        _say(f"{config}: step {step + 1}/{spec['steps']} loss {loss:.3f} in "
             f"{time.time() - ts:.1f} s, peak RSS {_rss_peak() / 2**30:.2f} GiB")
    if not all(math.isfinite(s["loss"]) for s in steps):
        raise RuntimeError(f"{config}: non-finite loss {[s['loss'] for s in steps]}")
    row.update(steps=steps, state_bytes=_state_bytes(opt), peak_rss=_rss_peak(),
               rss_end=_rss_now(), seconds=time.time() - t0)
    if cuda:
        row["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
    return row


def worker(spec_json: str) -> int:
    """The child's entry point: measure one configuration, print its row as one JSON line."""
    row = measure_one(json.loads(spec_json))
    print("PEAK-ROW " + json.dumps(row), flush=True)
    return 0


# ------------------------------------------------------------------------------ the parent
def child_env(threads: int, malloc: str) -> dict:
    env = dict(os.environ)
    env.update(MALLOC[malloc])
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = report.ROOT + (os.pathsep + env["PYTHONPATH"]
                                       if env.get("PYTHONPATH") else "")
    return env


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    """One configuration in a fresh process; its progress lines are echoed to stderr; a failure
    is a row with its error."""
    import collections
    import tempfile
    import threading
    code = "import sys; from benchmarks.peak import worker; sys.exit(worker(sys.argv[1]))"
    t0 = time.time()
    tail = collections.deque(maxlen=40)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env,
                                cwd=report.ROOT, stdout=out, stderr=subprocess.PIPE, text=True)

        def echo():
            for line in proc.stderr:
                tail.append(line.rstrip())
                if line.startswith("[peak:child]"):
                    print(line.rstrip(), file=sys.stderr, flush=True)
        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return dict(config=spec["config"], status="failed", label=label(spec["config"]),
                        reason=f"over the {timeout:.0f} s limit")
        reader.join(timeout=10)
        out.seek(0)
        stdout = out.read()
    for line in stdout.splitlines():
        if line.startswith("PEAK-ROW "):
            row = json.loads(line[len("PEAK-ROW "):])
            row.setdefault("seconds", time.time() - t0)
            return row
    last = [ln for ln in tail if ln.strip()][-1:] or ["no output"]
    return dict(config=spec["config"], status="failed", label=label(spec["config"]),
                reason=f"exit code {proc.returncode}: {last[0][:300]}",
                stderr_tail="\n".join(tail)[-3000:])


def ratios(rows: list[dict]) -> None:
    """Add ``vs_adamw`` (peak RSS) and ``train_vs_adamw`` (peak above the import baseline) to
    every measured row, against the reference row of the same run (``run``, 1 when absent; in
    place)."""
    for run_id in sorted({r.get("run", 1) for r in rows}):
        mine = [r for r in rows if r.get("run", 1) == run_id]
        ref = next((r for r in mine if r["config"] == REFERENCE and r["status"] == "ok"), None)
        for r in mine:
            if r["status"] != "ok":
                continue
            r["train_peak"] = r["peak_rss"] - r["rss_imports"]
            if ref is not None:
                r["vs_adamw"] = r["peak_rss"] / ref["peak_rss"]
                r["train_vs_adamw"] = r["train_peak"] / (ref["peak_rss"] - ref["rss_imports"])
                if "cuda_max_allocated" in r and "cuda_max_allocated" in ref:
                    r["cuda_vs_adamw"] = r["cuda_max_allocated"] / ref["cuda_max_allocated"]


def leanest(rows: list[dict], checkpointing: bool = True) -> dict | None:
    """The slimopt row with the lowest peak RSS (None when none ran); without activation
    checkpointing if ``checkpointing`` is False."""
    ours = [r for r in rows if r["status"] == "ok" and split_ckpt(r["config"])[0] not in PEERS
            and (checkpointing or not split_ckpt(r["config"])[1])]
    return min(ours, key=lambda r: r["peak_rss"]) if ours else None


# ------------------------------------------------------------------------------ computed table
def activation_bytes(hidden: int, inter: int, heads: int, layers: int, vocab: int,
                     tokens: int, elem: int, checkpointing: bool = False) -> int:
    """Bytes of the tensors autograd saves for one forward of transformers'
    ``LlamaForCausalLM`` (SDPA attention, float32 or bfloat16 weights of ``elem`` bytes) on
    ``tokens`` = micro-batch x sequence tokens, plus the logits and their gradient:

    - per decoder layer: ``T (e (10 h + 4 i) + 4 heads + 8)``, plus ``4 T h`` in bfloat16 (the
      RMSNorm's float32 upcast): the norms' inputs and outputs, the q/k/v/o inputs, RoPE's, the
      attention's q/k/v/output and float32 log-sum-exp, the MLP's gate/up/SiLU/down inputs;
    - outside the layers: ``T (4 V + 4 h + 2.5 e h)``: the loss's float32 log-softmax, the final
      norm, the embedding's indices;
    - the logits and their gradient while the loss backpropagates: ``2 T V 4``;
    - with activation checkpointing (one checkpoint per decoder layer): each layer keeps its
      input (``T h e``) and one layer's activations are recomputed at a time.
    """
    t, h, i, e = tokens, hidden, inter, elem
    per_layer = t * (e * (10 * h + 4 * i) + 4 * heads + 8 + (4 * h if e < 4 else 0))
    outside = t * (4 * vocab + 4 * h) + int(2.5 * e * h * t)
    logits = 2 * t * vocab * 4
    layers_part = layers * t * h * e + per_layer if checkpointing else layers * per_layer
    return layers_part + outside + logits


def computed_row(name: str, weights: int, grads: int, state: int, act: int,
                 act_ckpt: int, **extra) -> dict:
    """One row of the computed table: the parts and the totals without and with activation
    checkpointing."""
    return dict(extra, name=name, weights=weights, grads=grads, state=state, activations=act,
                activations_ckpt=act_ckpt, total=weights + grads + state + act,
                total_ckpt=weights + grads + state + act_ckpt)


def _bnb_8bit_state(model) -> int:
    """bitsandbytes ``AdamW8bit``'s state bytes for ``model`` (its defaults: 8-bit block-wise
    states for tensors of >= 4096 elements, else float32), allocated by its own ``init_state``
    on the meta device."""
    import bitsandbytes as bnb
    import slimopt
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    for gi, group in enumerate(opt.param_groups):
        for pi, p in enumerate(group["params"]):
            opt.init_state(group, p, gi, pi)
    return slimopt.state_bytes(opt)


def _slimopt_state(name: str, model, rank: int, state_dtype: str) -> int:
    import slimopt
    from slimopt.launch.registry import build_optimizer
    options = {} if state_dtype == "float32" else {"state_dtype": state_dtype}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = build_optimizer(name, model, lr=1e-3, rank=rank, **options)
        opt.init_state()
    return slimopt.state_bytes(opt)


def computed(sizes=COMPUTED_SIZES, tokens: int = BATCH * SEQ_LEN, optimizer=COMPUTED_OPTIMIZER,
             lean_state: str = "int8", progress=print) -> dict:
    """The computed table (module docstring) and the 7B-on-24-GB recipe for every slimopt
    optimizer. State bytes are counted on the meta device; a lean row uses ``lean_state`` where
    the optimizer takes a ``state_dtype``."""
    import torch
    from slimopt.launch.registry import OPTIMIZERS
    from .memory import LLAMA_SHAPES, llama_on_meta
    from .steptime import PAPER_RANK
    out = dict(tokens=tokens, optimizer=optimizer, gpu_bytes=GPU_BYTES, sizes={})
    for size in sizes:
        t0 = time.time()
        hidden, inter, heads, layers = LLAMA_SHAPES[size]
        rank = PAPER_RANK[size]
        rows = []
        for dtype, elem in ((torch.float32, 4), (torch.bfloat16, 2)):
            model = llama_on_meta(size).to(dtype)
            p = sum(x.numel() for x in model.parameters())
            largest = max(x.numel() for x in model.parameters()) * elem
            act = activation_bytes(hidden, inter, heads, layers, GALORE_VOCAB, tokens, elem)
            act_c = activation_bytes(hidden, inter, heads, layers, GALORE_VOCAB, tokens, elem,
                                     True)
            w = "fp32" if elem == 4 else "bf16"
            adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
            from .memory import _step_on_meta
            _step_on_meta(adamw, model)
            import slimopt
            rows.append(computed_row(f"AdamW, {w} weights", p * elem, p * elem,
                                     slimopt.state_bytes(adamw), act, act_c, weights_dtype=w))
            del adamw
            for prm in model.parameters():
                prm.grad = None
            try:
                b8 = _bnb_8bit_state(model)
                rows.append(computed_row(f"AdamW8bit (bitsandbytes), {w} weights", p * elem,
                                         p * elem, b8, act, act_c, weights_dtype=w))
            except ImportError as err:
                rows.append(dict(name=f"AdamW8bit (bitsandbytes), {w} weights",
                                 reason=f"not installed: {err}"))
            plain = _slimopt_state(optimizer, model, rank, "float32")
            rows.append(computed_row(f"{_display(optimizer)} plain, {w} weights", p * elem,
                                     p * elem, plain, act, act_c, weights_dtype=w))
            state = _lean_state_dtype(optimizer, lean_state)
            lean = _slimopt_state(optimizer, model, rank, state)
            rows.append(computed_row(f"{_display(optimizer)} lean (in-backward"
                                     f"{' + ' + state if state != 'float32' else ''}), "
                                     f"{w} weights", p * elem, largest, lean, act, act_c,
                                     weights_dtype=w, state_dtype=state))
        out["sizes"][size] = dict(rank=rank, params=p, rows=rows)
        progress(f"[peak] computed {size} in {time.time() - t0:.0f} s")
    if "7b" in sizes:
        hidden, inter, heads, layers = LLAMA_SHAPES["7b"]
        model = llama_on_meta("7b").to(torch.bfloat16)
        p = sum(x.numel() for x in model.parameters())
        largest = max(x.numel() for x in model.parameters()) * 2
        act_c = activation_bytes(hidden, inter, heads, layers, GALORE_VOCAB, tokens, 2, True)
        recipe = []
        for name in OPTIMIZERS:
            state = _lean_state_dtype(name, lean_state)
            b = _slimopt_state(name, model, PAPER_RANK["7b"], state)
            row = computed_row(f"{_display(name)} lean (in-backward"
                               f"{' + ' + state if state != 'float32' else ''})", 2 * p,
                               largest, b, act_c, act_c, state_dtype=state, key=name)
            row["fits"] = row["total_ckpt"] <= GPU_BYTES
            # under accumulation every parameter's bf16 .grad lives from its first micro-batch
            # to its step
            row["total_ckpt_accumulation"] = row["total_ckpt"] - largest + 2 * p
            row["fits_accumulation"] = row["total_ckpt_accumulation"] <= GPU_BYTES
            recipe.append(row)
        out["recipe_7b"] = dict(rank=PAPER_RANK["7b"], rows=recipe)
        progress("[peak] computed the 7B recipe")
    return out


def _display(name: str) -> str:
    from slimopt.launch.records import BY_NAME
    return BY_NAME[name].display


# ------------------------------------------------------------------------------ tables, figure
def gib(b) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.0f} MiB"


def gb(b) -> str:
    return f"{b / 1e9:.1f} GB"


def measured_markdown(data: dict) -> list[str]:
    s = data["settings"]
    rows = data["rows"]
    cuda = any("cuda_max_allocated" in r for r in rows)
    lines = [f"## Peak memory of training steps: LLaMA {s['preset']}, micro-batch "
             f"{s['batch']} x {s['seq_len']}, {s['steps']} steps, {s['device']}", "",
             f"One fresh process per configuration ({data['params'] / 1e6:.1f}M parameters, "
             f"float32 weights, random token ids; {s['threads']} threads; "
             f"allocator: {data['malloc_note']}). "
             "Peak RSS: `ru_maxrss` of the child; training part: peak RSS minus the RSS after the "
             "imports and a toy model's forward and backward (weights, gradients, optimizer "
             "state, activations). Ratios: to "
             "torch AdamW (`foreach=False`) in the same run. State: `slimopt.state_bytes` after "
             "the last step. Lean: `slimopt.step_in_backward(opt)` (each parameter steps "
             "during backward, its gradient freed at once) with the state dtype named.", ""]
    runs = data.get("runs") or []
    several = len(runs) > 1
    if several:
        lines += ["The rows come from these runs (same settings; each row's ratios are to the "
                  "AdamW row of its own run):", ""]
        lines += [f"- run {i + 1}: `{run['command']}` · commit `{run['commit']}` · "
                  f"{run['time']}" for i, run in enumerate(runs)]
        lines.append("")
    lines += ["| configuration |" + (" run |" if several else "") + " peak RSS | x AdamW | "
              "training part | x AdamW | imports | optimizer state |"
              + (" CUDA max allocated | x AdamW |" if cuda else "") + " time |",
              "|---|" + ("---:|" if several else "") + "---:|---:|---:|---:|---:|---:|"
              + ("---:|---:|" if cuda else "") + "---:|"]
    for r in rows:
        name = r.get("label") or r["config"]
        run_cell = [str(r.get("run", 1))] if several else []
        if r["status"] != "ok":
            lines.append("| " + " | ".join([name] + run_cell) + f" | {r['status']}: "
                         f"{r.get('reason', '')} | | | | | |" + (" | |" if cuda else "") + " |")
            continue
        ratio = (lambda k: f"{r[k]:.2f}" if k in r else "-")
        cells = [name] + run_cell + [gib(r["peak_rss"]), ratio("vs_adamw"), gib(r["train_peak"]),
                 ratio("train_vs_adamw"), gib(r["rss_imports"]), gib(r["state_bytes"])]
        if cuda:
            cells += [gib(r.get("cuda_max_allocated")), ratio("cuda_vs_adamw")]
        cells.append(f"{r.get('seconds', 0):.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    plain, overall = leanest(rows, False), leanest(rows)
    for best in [r for r in (plain, overall if overall is not plain else None)
                 if r is not None and "vs_adamw" in r]:
        met = "met" if best["vs_adamw"] <= GOAL else "not met"
        which = ("" if split_ckpt(best["config"])[1]
                 else " without activation checkpointing" if overall is not plain else "")
        lines += ["", f"Leanest slimopt configuration{which}: **{best['label']}**, peak RSS "
                      f"{gib(best['peak_rss'])} = **{best['vs_adamw']:.2f}x** torch AdamW's "
                      f"(training part {best['train_vs_adamw']:.2f}x). Goal <= {GOAL:.2f}x: "
                      f"**{met}**" + (" (the goal is stated for LLaMA 350m on the CPU)"
                                      if s["preset"] != "350m" or s["device"] != "cpu" else "")
                      + "."]
    return lines


def computed_markdown(comp: dict) -> list[str]:
    lines = ["## Computed, 1B and 7B", "",
             f"Micro-batch 1 x {comp['tokens']} tokens (1 sequence of {comp['tokens']}), "
             "GaLore's shapes (vocab 32000). Weights and gradients: parameters x 2 or 4 bytes "
             "(lean: only the largest single gradient, the embedding's or the head's, is alive at "
             "a time). State: counted exactly on the meta device by each optimizer's own code "
             "(`slimopt.state_bytes`; bitsandbytes' `AdamW8bit` through its `init_state`), "
             "at the GaLore paper's rank (1b: 512, 7b: 1024), slimopt's split (projections "
             "low-rank, embeddings, head and norms AdamW). Activations "
             "(`benchmarks.peak.activation_bytes`; per layer `T (e (10 h + 4 i) + 4 heads + 8)` "
             "(+ `4 T h` in bf16), outside the layers `T (4 V + 4 h + 2.5 e h)` plus the logits "
             "and their gradient `8 T V`; with checkpointing `L T h e` plus one layer's): the "
             "tensors autograd saves for transformers' LlamaForCausalLM with SDPA attention. "
             "Not counted: the CUDA context and library workspaces, allocator fragmentation, an "
             "optimizer step's transient buffers. 1 GB = 10^9 bytes.", ""]
    for size, block in comp["sizes"].items():
        lines += [f"### LLaMA {size} ({block['params'] / 1e9:.2f}B parameters, rank "
                  f"{block['rank']})", "",
                  "| configuration | weights | gradients | state | activations (ckpt) | "
                  "total | total with checkpointing |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in block["rows"]:
            if "reason" in r:
                lines.append(f"| {r['name']} | {r['reason']} | | | | | |")
                continue
            lines.append(f"| {r['name']} | {gb(r['weights'])} | {gb(r['grads'])} | "
                         f"{gb(r['state'])} | {gb(r['activations'])} "
                         f"({gb(r['activations_ckpt'])}) | {gb(r['total'])} | "
                         f"{gb(r['total_ckpt'])} |")
        lines.append("")
    recipe = comp.get("recipe_7b")
    if recipe:
        fits = [r for r in recipe["rows"] if r["fits"]]
        lines += ["### LLaMA-7B on a 24 GB GPU", "",
                  "GaLore's recipe in slimopt: bf16 weights, steps in backward "
                  "(`slimopt.step_in_backward(opt, accumulation_steps=N)`: micro-batch 1, "
                  "gradients accumulated to the batch of 512 in `.grad` until the N-th "
                  "micro-batch), int8 states (`state_dtype=\"int8\"`), activation "
                  f"checkpointing, rank {recipe['rank']}. `step_in_backward` accumulates in "
                  "`.grad`: with `accumulation_steps=1` (each micro-batch a step, which is what "
                  "GaLore's per-layer hook does whatever its accumulation setting, GaLore#78) "
                  "one gradient is alive at a time; with `accumulation_steps > 1` every "
                  "parameter's bf16 `.grad` lives from its first micro-batch to its step, "
                  "which adds the weights' bytes again (last two columns).", "",
                  "| slimopt optimizer | weights | gradient (one at a time) | state | "
                  "activations (ckpt) | total | fits in 24 GB | total with accumulation | fits |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in recipe["rows"]:
            lines.append(f"| {r['name']} | {gb(r['weights'])} | {gb(r['grads'])} | "
                         f"{gb(r['state'])} | {gb(r['activations_ckpt'])} | "
                         f"{gb(r['total_ckpt'])} | {'yes' if r['fits'] else 'no'} | "
                         f"{gb(r['total_ckpt_accumulation'])} | "
                         f"{'yes' if r['fits_accumulation'] else 'no'} |")
        best = min(recipe["rows"], key=lambda r: r["total_ckpt"])
        lines += ["", "Fits in 24 GB (computed, `accumulation_steps=1`): "
                  + (", ".join(r["name"] for r in fits) or "none")
                  + f"; the smallest total is {best['name']}'s, {gb(best['total_ckpt'])}. With "
                  "accumulation in `.grad`: "
                  + (", ".join(r["name"] for r in recipe["rows"] if r["fits_accumulation"])
                     or "none (bf16 weights and bf16 gradients alone are 27 GB)") + "."]
    return lines


def markdown(data: dict) -> str:
    lines = measured_markdown(data)
    if data.get("computed"):
        lines += [""] + computed_markdown(data["computed"])
    return "\n".join(lines)


def figure(data: dict):
    plt = report.pyplot()
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 0.4 * len(rows) + 1.6))
    several = len({r.get("run", 1) for r in rows}) > 1
    names = [r["label"] + (f" [run {r.get('run', 1)}]" if several else "") for r in rows]
    base = [r["rss_imports"] / 2**30 for r in rows]
    train = [r["train_peak"] / 2**30 for r in rows]
    colours = ["black" if split_ckpt(r["config"])[0] == REFERENCE
               else "tab:orange" if split_ckpt(r["config"])[0] in PEERS
               else "tab:blue" if r["config"].endswith(LEAN) else "tab:cyan" for r in rows]
    y = range(len(rows))
    ax.barh(y, base, color="lightgrey", label="imports")
    ax.barh(y, train, left=base, color=colours)
    for i, r in enumerate(rows):
        text = gib(r["peak_rss"]) + (f" ({r['vs_adamw']:.2f}x)" if "vs_adamw" in r else "")
        ax.text(base[i] + train[i] + 0.05, i, text, va="center", fontsize=7)
    ref = next((r for r in reversed(rows) if r["config"] == REFERENCE), None)  # the last run's
    if ref is not None:
        ax.axvline(GOAL * ref["peak_rss"] / 2**30, color="red", ls=":", lw=1,
                   label=f"{GOAL:.2f}x AdamW's peak (goal)")
    ax.set_yticks(list(y), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("peak RSS, GiB (grey: RSS after the imports)")
    s = data["settings"]
    ax.set_title(f"Peak memory, LLaMA {s['preset']}, micro-batch {s['batch']} x {s['seq_len']}, "
                 f"{s['device']}", fontsize=10)
    ax.set_xlim(0, max(b + t for b, t in zip(base, train)) * 1.25)
    handles, names_ = ax.get_legend_handles_labels()
    for colour, what in (("black", "torch AdamW"), ("tab:orange", "peers"),
                         ("tab:cyan", "slimopt"), ("tab:blue", "slimopt lean")):
        handles.append(plt.Rectangle((0, 0), 1, 1, color=colour))
        names_.append(what)
    ax.legend(handles, names_, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ suite interface
def add_arguments(group) -> None:
    from slimopt.launch.presets import PRESETS
    group.add_argument("--peak-preset", choices=list(PRESETS), default=None,
                       help=f"LLaMA preset (default {DEFAULT_PRESET}; --quick: {QUICK_PRESET})")
    group.add_argument("--peak-configs", nargs="+", default=None,
                       help="configurations (default: all; --quick: "
                            f"{' '.join(QUICK_CONFIGS)}); NAME-ckpt: NAME with activation "
                            "checkpointing; adamw, the reference, is always run")
    group.add_argument("--peak-steps", type=int, default=STEPS,
                       help=f"training steps per configuration (default {STEPS})")
    group.add_argument("--peak-batch", type=int, default=BATCH,
                       help=f"micro-batch size (default {BATCH})")
    group.add_argument("--peak-seq-len", type=int, default=SEQ_LEN,
                       help=f"tokens per sequence (default {SEQ_LEN})")
    group.add_argument("--peak-threads", type=int, default=THREADS,
                       help=f"torch / OpenMP threads of each child (default {THREADS})")
    group.add_argument("--peak-rank", type=int, default=None,
                       help="rank of the low-rank methods (default: the preset's)")
    group.add_argument("--peak-lean-state", choices=("int8", "bfloat16", "float32"),
                       default="int8", help="state_dtype of the lean configurations (default "
                                            "int8, where the optimizer takes one)")
    group.add_argument("--peak-malloc", choices=sorted(MALLOC), default="mmap",
                       help="the children's glibc allocator settings (default mmap: "
                            "MALLOC_MMAP_THRESHOLD_=65536, see benchmarks/peak.py)")
    group.add_argument("--peak-no-computed", action="store_true",
                       help="skip the computed 1B/7B section")
    group.add_argument("--peak-merge", nargs="+", default=None, metavar="PEAK_JSON",
                       help="earlier runs' peak.json with the same settings: their rows are "
                            "kept (each with the ratios to its own run's AdamW) and listed "
                            "with this run's, each with its run's command and commit")
    group.add_argument("--peak-merge-only", action="store_true",
                       help="with --peak-merge: measure nothing, write the merged runs' tables")


def settings(args) -> dict:
    from slimopt.launch.presets import PRESETS
    quick = getattr(args, "quick", False)
    preset = args.peak_preset or (QUICK_PRESET if quick else DEFAULT_PRESET)
    configs = list(args.peak_configs or (QUICK_CONFIGS if quick else all_configs()))
    known = all_configs()
    unknown = [c for c in configs if split_ckpt(c)[0] not in known]
    if unknown:
        raise SystemExit(f"python -m benchmarks peak: unknown configuration(s) {unknown}; "
                         f"known: {' '.join(known)}")
    if args.peak_merge_only:
        if not args.peak_merge:
            raise SystemExit("python -m benchmarks peak: --peak-merge-only needs --peak-merge")
        configs = []
    elif REFERENCE not in configs:
        configs.insert(0, REFERENCE)
    for name, value in (("--peak-steps", args.peak_steps), ("--peak-batch", args.peak_batch),
                        ("--peak-seq-len", args.peak_seq_len),
                        ("--peak-threads", args.peak_threads)):
        if value < 1:
            raise SystemExit(f"python -m benchmarks peak: {name} must be >= 1, got {value}")
    return dict(preset=preset, configs=list(dict.fromkeys(configs)), steps=args.peak_steps,
                batch=args.peak_batch, seq_len=args.peak_seq_len, threads=args.peak_threads,
                rank=args.peak_rank or PRESETS[preset][1]["rank"], lean_state=args.peak_lean_state,
                malloc=args.peak_malloc, device=args.device, seed=0,
                computed=not args.peak_no_computed, merge=args.peak_merge or [],
                merge_only=args.peak_merge_only)


#: the settings two merged runs must share
SHARED_SETTINGS = ("preset", "steps", "batch", "seq_len", "threads", "rank", "malloc", "device")


def earlier_runs(paths, s: dict) -> tuple[list, list]:
    """(runs, rows) of earlier runs' peak.json files, in order, each row numbered by its run;
    refused (``SystemExit``) when a file's settings differ from ``s``; a file that merged
    others brings theirs."""
    runs, rows = [], []
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path) as f:
            earlier = json.load(f)
        old = earlier["data"]["settings"]
        differ = [k for k in SHARED_SETTINGS if old.get(k) != s[k]]
        if differ:
            what = ", ".join(f"{k}: {old.get(k)} != {s[k]}" for k in differ)
            raise SystemExit(f"python -m benchmarks peak --peak-merge {path}: its settings "
                             f"differ ({what})")
        mine = earlier["data"].get("runs") or [{k: earlier[k] for k in ("command", "commit",
                                                                        "time")}]
        rows += [dict(r, run=r.get("run", 1) + len(runs)) for r in earlier["data"]["rows"]]
        if len(mine) == 1:  # a measuring run: the configurations it did not reach
            done = {r["config"] for r in earlier["data"]["rows"]}
            rows += [dict(config=c, status="not run", label=label(c), run=len(runs) + 1,
                          reason="the run was stopped before this configuration")
                     for c in old.get("configs", []) if c not in done]
        runs += mine
    return runs, measured_where_stopped(rows)


def measured_where_stopped(rows: list) -> list:
    """``rows`` without the "not run" rows of configurations that another run measured (a run
    stopped early, its missing configurations measured by a later one)."""
    measured = {r["config"] for r in rows if r["status"] != "not run"}
    return [r for r in rows if r["status"] != "not run" or r["config"] not in measured]


def malloc_note(malloc: str) -> str:
    if malloc == "mmap":
        return ("`MALLOC_MMAP_THRESHOLD_=65536` in every child (blocks of 64 KiB or more are "
                "mmapped and returned when freed)")
    return "glibc's defaults"


def run(args, folder: str, info: dict) -> list[str]:
    """Measure every configuration (one child each), then write peak.json/.md/.png; the files
    are rewritten after each configuration."""
    s = settings(args)
    say = (lambda m: print(m, file=sys.stderr, flush=True))
    from slimopt.launch.presets import PRESETS
    import transformers
    config_ = _model_config(s["preset"], s["seq_len"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        with torch.device("meta"):
            params = sum(p.numel() for p in transformers.LlamaForCausalLM(config_).parameters())
    data = dict(settings=s, params=params, malloc_note=malloc_note(s["malloc"]), rows=[],
                goal=GOAL, preset_vocab=PRESETS[s["preset"]][1]["vocab_size"], runs=[])
    if s["merge"]:
        data["runs"], data["rows"] = earlier_runs(s["merge"], s)
    this_run = len(data["runs"]) + 1
    if s["configs"]:
        data["runs"].append({k: info[k] for k in ("command", "commit", "time")})
    ratios(data["rows"])
    if s["computed"]:
        data["computed"] = computed(lean_state=s["lean_state"], progress=say)
    env = child_env(s["threads"], s["malloc"])
    paths = report.write(folder, "peak", info, data, markdown(data), figure(data))
    for i, config in enumerate(s["configs"]):
        spec = dict(config=config, preset=s["preset"], steps=s["steps"], batch=s["batch"],
                    seq_len=s["seq_len"], threads=s["threads"], rank=s["rank"],
                    lean_state=s["lean_state"], device=s["device"], seed=s["seed"])
        say(f"[peak] {i + 1}/{len(s['configs'])} {config} ...")
        row = run_child(spec, env, CHILD_TIMEOUT)
        row["run"] = this_run
        data["rows"].append(row)
        ratios(data["rows"])
        if row["status"] == "ok":
            say(f"[peak] {i + 1}/{len(s['configs'])} {row['label']}: peak RSS "
                f"{gib(row['peak_rss'])} (training part {gib(row['train_peak'])}"
                + (f", {row['vs_adamw']:.2f}x AdamW" if "vs_adamw" in row else "")
                + f"), state {gib(row['state_bytes'])}, {row['seconds']:.0f} s")
        else:
            say(f"[peak] {i + 1}/{len(s['configs'])} {row['label']}: {row['status']}: "
                f"{row.get('reason')}")
        paths = report.write(folder, "peak", info, data, markdown(data), figure(data))
    return paths
