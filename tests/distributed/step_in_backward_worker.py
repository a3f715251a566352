"""Run under torchrun (2 CPU ranks, gloo): ``slimopt.step_in_backward(..., ddp=model)`` against
ordinary DDP ``optimizer.step()`` on the same data and weights. Prints one JSON line per scenario
on rank 0.

    torchrun --nproc_per_node 2 tests/distributed/step_in_backward_worker.py SCENARIO [...]

A scenario is ``run:MODEL:ACCUM:CLIP[:STATE_DTYPE]`` (MODEL ``mlp``: GrassWalk on a 3-layer
MLP, DDP's default buckets; ``llama``: GaLore on a tiny LLaMA whose embeddings and head, stepped
by the dense AdamW rule, hold most weights, one-parameter buckets and
``gradient_as_bucket_view=True``; CLIP 0 for none; the moments in STATE_DTYPE, default
float32): the largest weight difference from the reference, whether every gradient was freed after
each step, and the logged gradient norm against the reference's. ``remove``: two steps in
backward, ``remove()``, two ordinary steps, against four ordinary ones. ``nosync``: accumulation
2 without ``no_sync`` raises. ``refuse``: no ``ddp=`` under 2 ranks, a second hook on the same
module, ``find_unused_parameters=True``.
"""
import json
import sys

import torch
import torch.distributed as dist

from tiny_model import tiny_llama
import slimopt

STEPS = 4
ROWS = 3  # rows per rank per micro-batch


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 6))


def build(kind, state_dtype="float32"):
    """The model, a function ``loss(model, batch)``, a batch maker, the optimizer's constructor
    and DDP's options for ``kind``."""
    if kind == "mlp":
        model = mlp()

        def make(g):
            return torch.randn(2 * ROWS, 12, generator=g), torch.randn(2 * ROWS, 6, generator=g)

        def loss(m, batch):
            return torch.nn.functional.mse_loss(m(batch[0]), batch[1])
        return model, loss, make, lambda p: slimopt.GrassWalk(
            p.named_parameters(), lr=1e-2, rank=4, update_interval=3,
            state_dtype=state_dtype), {}
    model = tiny_llama(vocab=256)

    def make(g):
        ids = torch.randint(0, 256, (2 * ROWS, 8), generator=g)
        return ids, ids

    def loss(m, batch):
        return m(input_ids=batch[0], labels=batch[1]).loss
    return model, loss, make, lambda p: slimopt.GaLore(
        slimopt.param_groups(p, rank=4), lr=1e-2, update_interval=3,
        state_dtype=state_dtype), \
        dict(bucket_cap_mb=1e-6, gradient_as_bucket_view=True)


def batches(make, accum):
    g = torch.Generator().manual_seed(11)
    rank = dist.get_rank()
    out = []
    for _ in range(STEPS):
        micro = []
        for _ in range(accum):
            x, y = make(g)
            micro.append((x[rank * ROWS:(rank + 1) * ROWS], y[rank * ROWS:(rank + 1) * ROWS]))
        out.append(micro)
    return out


def micro_steps(ddp, loss, micro, accum):
    for i, batch in enumerate(micro):
        with ddp.no_sync() if i < accum - 1 else torch.enable_grad():
            (loss(ddp, batch) / accum).backward()


def ordinary(kind, accum, clip, state_dtype="float32"):
    model, loss, make, optimizer, wrap = build(kind, state_dtype)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **wrap)
    opt = optimizer(model)
    norms = []
    for micro in batches(make, accum):
        micro_steps(ddp, loss, micro, accum)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
        if clip:
            for p in model.parameters():
                torch.nn.utils.clip_grad_norm_([p], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, norms


def in_backward(kind, accum, clip, state_dtype):
    model, loss, make, optimizer, wrap = build(kind, state_dtype)
    ddp = torch.nn.parallel.DistributedDataParallel(model, **wrap)
    opt = optimizer(model)
    handle = slimopt.step_in_backward(opt, accumulation_steps=accum,
                                      max_grad_norm=clip or None, ddp=ddp)
    norms, freed = [], True
    for micro in batches(make, accum):
        micro_steps(ddp, loss, micro, accum)
        freed = freed and handle.stepped and all(p.grad is None for p in model.parameters())
        norms.append(float(handle.take_grad_norm()))
    return model, norms, freed


def max_diff(a, b):
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def run(kind, accum, clip, state_dtype="float32"):
    reference, ref_norms = ordinary(kind, accum, clip, state_dtype)
    model, norms, freed = in_backward(kind, accum, clip, state_dtype)
    reference_moved = max_diff(reference, build(kind)[0])
    return dict(max_diff=max_diff(model, reference), freed=freed, moved=reference_moved,
                norm_diff=max(abs(a - b) / b for a, b in zip(norms, ref_norms)))


def remove():
    """Two steps in backward, remove(), two ordinary steps == four ordinary steps."""
    reference, _ = ordinary("mlp", 2, 0)
    model, loss, make, optimizer, wrap = build("mlp")
    ddp = torch.nn.parallel.DistributedDataParallel(model, **wrap)
    opt = optimizer(model)
    handle = slimopt.step_in_backward(opt, accumulation_steps=2, ddp=ddp)
    for i, micro in enumerate(batches(make, 2)):
        if i == 2:
            handle.remove()
        micro_steps(ddp, loss, micro, 2)
        if i >= 2:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return dict(max_diff=max_diff(model, reference))


def nosync():
    model, loss, make, optimizer, wrap = build("mlp")
    ddp = torch.nn.parallel.DistributedDataParallel(model, **wrap)
    slimopt.step_in_backward(optimizer(model), accumulation_steps=2, ddp=ddp)
    try:
        (loss(ddp, batches(make, 2)[0][0]) / 2).backward()
    except RuntimeError as err:
        return dict(error=str(err))
    return dict(error=None)


def refuse():
    errors = []
    model, _, _, optimizer, wrap = build("mlp")
    for attempt in (
            lambda: slimopt.step_in_backward(optimizer(model)),
            lambda: [slimopt.step_in_backward(optimizer(model), ddp=ddp) for ddp in
                     [torch.nn.parallel.DistributedDataParallel(model)] * 2],
            lambda: slimopt.step_in_backward(optimizer(model), ddp=torch.nn.parallel.
                                             DistributedDataParallel(model,
                                                                     find_unused_parameters=True)),
            lambda: slimopt.step_in_backward(optimizer(model), ddp=model)):
        try:
            attempt()
            errors.append(None)
        except ValueError as err:
            errors.append(str(err))
    return dict(errors=errors)


def main():
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for scenario in sys.argv[1:]:
        kind, *rest = scenario.split(":")
        if kind == "run":
            row = run(rest[0], int(rest[1]), float(rest[2]), *rest[3:])
        else:
            row = {"remove": remove, "nosync": nosync, "refuse": refuse}[kind]()
        if dist.get_rank() == 0:
            print(json.dumps(dict(scenario=scenario, **row)), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
