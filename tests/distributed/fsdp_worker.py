"""Run under torchrun (gloo, CPU): slimopt's optimizers on a tiny LLaMA sharded with FSDP2
(``fully_shard`` on each decoder layer and the root), built the ordinary way on the DTensor
parameters. Prints one JSON line per scenario on rank 0.

    torchrun --nproc_per_node 2 tests/distributed/fsdp_worker.py SCENARIO [SCENARIO ...]

Scenarios:

- ``run:OPTIMIZER:DTYPE:ACCUM`` (DTYPE fp32 or bf16, FSDP2's ``MixedPrecisionPolicy`` with bf16
  compute and fp32 reduction): ``replay_diff`` compares the sharded run after each step with
  the optimizer run in one process on FSDP2's own gradients (``full_tensor()``) from the same
  weights; ``e2e_diff`` (fp32) compares it with one process on the same global batch, its
  gradient formed as FSDP2 forms it (each rank's accumulated half, summed, times 1 / world).
  Accumulation skips the gradient sync on all but the last micro-batch
  (``set_requires_gradient_sync``), FSDP2's documented pattern.
- ``naive:OPTIMIZER``: the negative control: the same optimizer run on each rank's local shards
  as if they were the parameters.
- ``dcp:PHASE:OPTIMIZER`` with ``FSDP_CKPT_DIR``: a run checkpointed with
  ``torch.distributed.checkpoint`` and moved between world sizes. PHASE ``a`` (2 ranks):
  6 steps uninterrupted, saved after 2; ``b`` (1 rank): load, steps 3-4, save; ``c`` (2 ranks):
  load, steps 5-6, compare with ``a``'s end. Every step uses the same 2 data halves: one rank
  runs both halves (loss / 2 each), so the gradients are those of the 2-rank run.
- ``balance:OPTIMIZER``: per-rank state bytes (``slimopt.state_bytes``, local shards) after a step,
  against the plan (``slimopt.distributed.fsdp.plan``).
- ``nonfinite:skip|raise``: a NaN in one rank's shard of a gradient is decided for the whole
  parameter on every rank.
- ``time:OPTIMIZER``: seconds per step under FSDP2, in one process, and torch AdamW under FSDP2
  (a measurement, not a test).
- ``refuse``: the layouts slimopt does not support are refused at construction.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import slimopt
from slimopt.distributed.fsdp import plan
from slimopt.launch import records
from slimopt.launch.registry import split_for
from tiny_model import tiny_llama as base_llama

STEPS = 3
HALVES = 2   # the data is always cut in 2 halves (2 data ranks), whatever the world size
ROWS, SEQ = 2, 8
METHODS = {m.name: m for m in records.in_suite(records.ZERO)}
OPTIONS = {name: dict(lr=1e-2, **(dict(rank=4, update_interval=2) if m.ranked else {}))
           for name, m in METHODS.items()}
LORA = {name for name, m in METHODS.items() if m.split == records.LORA_PAIRS}


def tiny_llama(name, layers=2, hidden=24):
    model = base_llama(layers, hidden, SEQ)
    if name in LORA:  # peft's LoRA factors, B made non-zero so the pair math is exercised
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    return model


def optimizer_for(name, model):
    method = METHODS[name]
    options = dict(OPTIONS[name])
    rank = options.pop("rank", None)
    return method.build(split_for(method, model, rank), **options)


def shard(model, mp=None):
    layers = model.base_model.model.model.layers if hasattr(model, "base_model") and \
        hasattr(model.base_model, "model") else model.model.layers
    for layer in layers:
        fully_shard(layer, mp_policy=mp or MixedPrecisionPolicy())
    fully_shard(model, mp_policy=mp or MixedPrecisionPolicy())
    return model


def data(steps, accum):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (steps, accum, HALVES, ROWS, SEQ), generator=g)


def loss_of(model, rows):
    return model(input_ids=rows, labels=rows).loss


def sharded_backward(model, batch, accum, rank, world):
    """This rank's halves of one step's ``batch`` (accum, halves, rows, seq), gradients synced on
    the last micro-batch only; with fewer ranks than halves, a rank runs several halves, each
    loss scaled so the gradient is the 2-rank one."""
    mine = [h for h in range(HALVES) if h % world == rank]
    passes = [(a, h) for a in range(accum) for h in mine]
    for i, (a, h) in enumerate(passes):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(passes) - 1)
        (loss_of(model, batch[a, h]) * (world / HALVES / accum)).backward()


def reference_grads(model, batch, accum):
    """One process: each half's gradient accumulated over the micro-batches, the halves summed
    and scaled by 1 / 2, as FSDP2's reduce-scatter forms it."""
    params = [p for p in model.parameters() if p.requires_grad]
    halves = []
    for h in range(HALVES):
        for p in params:
            p.grad = None
        for a in range(accum):
            (loss_of(model, batch[a, h]) / accum).backward()
        halves.append([p.grad for p in params])
    for i, p in enumerate(params):
        p.grad = (halves[0][i] + halves[1][i]) * (1.0 / HALVES)


def full(p):
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def max_diff(model, other):
    pairs = zip(model.parameters(), other.parameters())
    return max(float((full(p).detach().float() - q.detach().float()).abs().max())
               for p, q in pairs)


def run(name, dtype, accum, rank, world):
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dtype == "bf16" else None
    model = shard(tiny_llama(name), mp)
    opt = optimizer_for(name, model)
    replay_model, e2e_model = tiny_llama(name), tiny_llama(name)
    replay_opt, e2e_opt = optimizer_for(name, replay_model), optimizer_for(name, e2e_model)
    batches = data(STEPS, accum)
    replay = 0.0
    for step in range(STEPS):
        sharded_backward(model, batches[step], accum, rank, world)
        with torch.no_grad():  # the replay starts from the sharded run's weights
            for p, q in zip(model.parameters(), replay_model.parameters()):
                q.copy_(full(p))
                q.grad = full(p.grad).clone() if p.grad is not None else None
        opt.step()
        replay_opt.step()
        opt.zero_grad()
        replay = max(replay, max_diff(model, replay_model))
        if dtype == "fp32":
            reference_grads(e2e_model, batches[step], accum)
            e2e_opt.step()
            e2e_opt.zero_grad()
    counted = torch.tensor([opt.step_router.transfer.communicated.get("all_to_all_bytes", 0)])
    dist.all_reduce(counted)  # summed over the ranks: owners send back more than they receive
    out = {"replay_diff": replay,
           "moved": max_diff(model, tiny_llama(name)),
           "state_bytes": slimopt.state_bytes(opt),
           # bytes all ranks together passed to the two all_to_all exchanges per step (their
           # own pieces included), against the trainable elements of the model
           "sent_bytes_per_step": int(counted) // STEPS,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "matrix_elements": sum(p.numel() for unit in plan(opt, world).units for p in unit)}
    if dtype == "fp32":
        out["e2e_diff"] = max_diff(model, e2e_model)
    return out


def run_naive(name, rank, world):
    """The rule applied to each rank's shards as if they were whole parameters."""
    model = shard(tiny_llama(name))
    e2e_model = tiny_llama(name)
    e2e_opt = optimizer_for(name, e2e_model)
    shards = {p: torch.nn.Parameter(p.to_local().detach()) for p in model.parameters()}
    local_model = tiny_llama(name)  # only to reuse the method's split on the shards' names
    for (n, q), p in zip(local_model.named_parameters(), model.parameters()):
        q.data = shards[p].data
    opt = optimizer_for(name, local_model)
    batches = data(STEPS, 1)
    for step in range(STEPS):
        sharded_backward(model, batches[step], 1, rank, world)
        for q, p in zip(local_model.parameters(), model.parameters()):
            q.grad = p.grad.to_local() if p.grad is not None else None
        opt.step()
        opt.zero_grad()
        model.zero_grad()
        reference_grads(e2e_model, batches[step], 1)
        e2e_opt.step()
        e2e_opt.zero_grad()
    return {"naive_diff": max_diff(model, e2e_model)}


def run_dcp(phase, name, rank, world, folder):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model = shard(tiny_llama(name))
    opt = optimizer_for(name, model)
    batches = data(6, 1)

    def steps(first, last):
        for step in range(first, last):
            sharded_backward(model, batches[step], 1, rank, world)
            opt.step()
            opt.zero_grad()

    def save(where):
        model_sd, opt_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=where)

    def load(where):
        model_sd, opt_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": opt_sd}
        dcp.load(state, checkpoint_id=where)
        set_state_dict(model, opt, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    out = {}
    if phase == "a":
        steps(0, 2)
        save(os.path.join(folder, "after2"))
        if rank == 0:
            torch.save(opt.state_dict(), os.path.join(folder, "rank0-plain.pt"))
        steps(2, 6)
        final = {n: full(p).detach().clone() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(final, os.path.join(folder, "uninterrupted.pt"))
    elif phase == "b":
        load(os.path.join(folder, "after2"))
        out["refused"] = _refuses_share(opt, os.path.join(folder, "rank0-plain.pt"))
        steps(2, 4)
        save(os.path.join(folder, "after4"))
    else:
        load(os.path.join(folder, "after4"))
        steps(4, 6)
        final = torch.load(os.path.join(folder, "uninterrupted.pt"))
        out["resume_diff"] = max(float((full(p).detach() - final[n]).abs().max())
                                 for n, p in model.named_parameters())
        out["steps"] = sorted({s["step"] for s in opt.state.values() if "step" in s})
    return out


def _refuses_share(opt, path):
    """One rank's plain state_dict() at world 2 loaded at world 1: refused, nothing changed."""
    before = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
              for k, s in opt.state.items()}
    try:
        opt.load_state_dict(torch.load(path, weights_only=True))
    except ValueError as err:
        same = all(torch.equal(full(before[k][n]), full(v)) if torch.is_tensor(v)
                   else before[k][n] == v for k, s in opt.state.items() for n, v in s.items())
        return same and "torch.distributed.checkpoint" in str(err)
    return False


def run_balance(name, rank, world):
    model = shard(tiny_llama(name, layers=4, hidden=48))
    opt = optimizer_for(name, model)
    loss_of(model, data(1, 1)[0, 0, rank % HALVES]).backward()  # every rank runs a batch
    opt.step()
    mine = torch.tensor([slimopt.state_bytes(opt)], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    single = tiny_llama(name, layers=4, hidden=48)
    single_opt = optimizer_for(name, single)
    single_opt.init_state()
    adamw = torch.optim.AdamW(single.parameters())
    for p in single.parameters():
        adamw.state[p] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    return {"per_rank": [int(t.item()) for t in every],
            "planned": plan(opt, world).per_rank,
            "single": slimopt.state_bytes(single_opt),
            "adamw": slimopt.state_bytes(adamw)}


def run_nonfinite(mode, rank, world):
    """A NaN in rank 1's shard of one matrix's and one norm's gradient: with "skip" both stay
    unchanged on every rank and the rest trains; with "raise" every rank raises and nothing
    changes."""
    model = shard(tiny_llama("grasswalk"))
    opt = _built(model, mode)
    sharded_backward(model, data(1, 1)[0], 1, rank, world)
    named = dict(model.named_parameters())
    poisoned = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"]
    if rank == world - 1:
        for n in poisoned:
            named[n].grad.to_local().view(-1)[0] = float("nan")
    before = {n: full(p).detach().clone() for n, p in named.items()}
    try:
        opt.step()
        raised = False
    except FloatingPointError:
        raised = True
    changed = {n for n, p in named.items() if not torch.equal(full(p).detach(), before[n])}
    return {"raised": raised, "poisoned_changed": sorted(changed & set(poisoned)),
            "others_changed": len(changed - set(poisoned)), "skips": opt.nonfinite_skips()}


def _built(model, mode):
    method = METHODS["grasswalk"]
    return method.build(split_for(method, model, 4), lr=1e-2, update_interval=2,
                        nonfinite=mode)


def run_timing(name, rank, world, steps=6):
    """Median seconds per ``optimizer.step()`` (slowest rank) for the optimizer under FSDP2, the
    same optimizer in one process on the whole model, and torch's AdamW under FSDP2: a
    measurement for the README, not a test."""
    import statistics
    import time

    def timed(model, opt, sharded):
        seconds = []
        for step in range(steps):
            rows = data(1, 1)[0, 0, rank % HALVES]
            loss_of(model, rows).backward()
            if sharded:
                dist.barrier()
            start = time.perf_counter()
            opt.step()
            if sharded:
                dist.barrier()
            seconds.append(time.perf_counter() - start)
            opt.zero_grad()
        return statistics.median(seconds[1:])

    sharded = shard(tiny_llama(name, layers=4, hidden=96))
    out = {"fsdp2": timed(sharded, optimizer_for(name, sharded), True)}
    adamw_model = shard(tiny_llama(name, layers=4, hidden=96))
    out["adamw_fsdp2"] = timed(adamw_model, torch.optim.AdamW(adamw_model.parameters()), True)
    single = tiny_llama(name, layers=4, hidden=96)
    out["one_process"] = timed(single, optimizer_for(name, single), False)
    return out


def run_refusals(rank, world):
    """Layouts slimopt does not support, each refused at construction with the supported list."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    cases = {
        "tensor-parallel": [distribute_tensor(torch.randn(8, 6), mesh, [Shard(1)])],
        "replicated": [distribute_tensor(torch.randn(8, 6), mesh, [Replicate()])],
        "mixed": [distribute_tensor(torch.randn(8, 6), mesh, [Shard(0)]), torch.randn(4, 3)],
    }
    for case, tensors in cases.items():
        params = [torch.nn.Parameter(t) for t in tensors]
        try:
            slimopt.GrassWalk(params, rank=2)
            results[case] = "accepted"
        except TypeError as err:
            results[case] = "refused" if "supported:" in str(err) else f"unclear: {err}"
    return results


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    for scenario in sys.argv[1:]:
        kind, *rest = scenario.split(":")
        if kind == "run":
            out = run(rest[0], rest[1], int(rest[2]), rank, world)
        elif kind == "naive":
            out = run_naive(rest[0], rank, world)
        elif kind == "dcp":
            out = run_dcp(rest[0], rest[1], rank, world, os.environ["FSDP_CKPT_DIR"])
        elif kind == "balance":
            out = run_balance(rest[0], rank, world)
        elif kind == "nonfinite":
            out = run_nonfinite(rest[0], rank, world)
        elif kind == "time":
            out = run_timing(rest[0], rank, world)
        elif kind == "refuse":
            out = run_refusals(rank, world)
        else:
            raise SystemExit(f"unknown scenario {scenario}")
        if rank == 0:
            print(json.dumps({"scenario": scenario, **out}), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    # skip interpreter teardown: a gloo or checkpoint-writer thread still being destroyed there
    # has aborted the process now and then ("terminate called without an active exception")
    # after every result was printed
    os._exit(0)


if __name__ == "__main__":
    main()
