"""Run under torchrun (2 CPU ranks, gloo): for each scenario, train a tiny LLaMA k steps with
slimopt.launch.initialize under a ZeRO stage and compare with the same optimizer run in one
process on the same global batch, and (``replay_diff``) the engine's fp32 master weights with
that optimizer run in one process on DeepSpeed's own gradients from the same start (exact on any
machine). Prints one JSON line per scenario on rank 0.

    torchrun --nproc_per_node 2 tests/distributed/zero_worker.py SCENARIO [SCENARIO ...]

A scenario is OPTIMIZER:STAGE:DTYPE:ACCUM (e.g. grasswalk:1:fp32:1), ckpt:OPTIMIZER:STAGE
(save, load into a fresh engine, continue: equal to the uninterrupted run), or
naive:OPTIMIZER:STAGE (the negative control: deepspeed.initialize without slimopt's bridge, the
optimizer run on DeepSpeed's flat shards as if they were parameters), or grads:STAGE (DeepSpeed's
own averaged gradients under STAGE vs ZeRO-0, through plain SGD with lr 1), or
reshard-save|reshard-load|reshard-back:OPTIMIZER:STAGE (a checkpoint moved 2 -> 1 -> 2 ranks: run
save and back with 2 ranks, load with 1, all with the same ZERO_CKPT_DIR), or
loadcheck:OPTIMIZER:STAGE (one rank, after reshard-save: the bridge's load_state_dict refuses
another world size's share, wrong shapes and unknown parameters, changing nothing), or
nonfinite:STAGE:CLIP:loss|partition (nonfinite="raise": every rank raises together, nothing
changes, no hang), or balance:STAGE (per-rank GrassWalk state bytes on a 4-layer LLaMA, run
with 4 ranks), or skipslice:STAGE (nonfinite="skip" with a NaN in one rank's slice of an
element-wise parameter: skipped whole on every rank), or time:OPTIMIZER:STAGE (seconds per
engine.step() through the bridge, for DeepSpeed's own AdamW and for the optimizer in one
process; a measurement, not a test).
"""
import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402

from tiny_model import tiny_llama as base_llama  # noqa: E402
import slimopt  # noqa: E402
from slimopt.launch import records  # noqa: E402
from slimopt.launch.zero import initialize  # noqa: E402

STEPS = int(os.environ.get("ZERO_STEPS", "3"))
MICRO = 2  # sequences per rank per micro-step
SEQ = 8
#: the methods the ZeRO tests run (their records name the "zero" suite), with small options
ZERO_METHODS = {m.name: m for m in records.in_suite(records.ZERO)}
OPT_PARAMS = {name: dict(lr=1e-2, **(dict(rank=4, update_interval=2) if m.ranked else {}))
              for name, m in ZERO_METHODS.items()}
TYPES = {name: m.build.__name__ for name, m in ZERO_METHODS.items()}
#: methods that train LoRA pairs: their model gets adapters
LORA = {name for name, m in ZERO_METHODS.items() if m.split == records.LORA_PAIRS}


def tiny_llama(lora, layers=2, hidden=24):
    model = base_llama(layers, hidden, SEQ)
    if lora:
        slimopt.lora.apply_lora(model, rank=3, alpha=6)
        for name, p in model.named_parameters():  # non-zero B so the pair math is exercised
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    return model


def batches(world, accum):
    g = torch.Generator().manual_seed(1)
    total = STEPS * accum * world * MICRO
    return torch.randint(0, 64, (total, SEQ), generator=g)


def reference(name, accum, world):
    """The same optimizer, one process, the whole global batch per step (mean of the losses)."""
    model = tiny_llama(name in LORA)
    section = {"type": "slimopt." + TYPES[name], "params": dict(OPT_PARAMS[name])}
    from slimopt.launch.zero import build_from_config
    opt = build_from_config(section, model)
    data = batches(world, accum)
    per_step = accum * world * MICRO
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(STEPS):
        chunk = data[step * per_step:(step + 1) * per_step].view(accum, world, MICRO, SEQ)
        per_rank = []
        # as DeepSpeed: each rank accumulates (loss / accum) over its micro-batches, then the
        # ranks' gradients are summed and scaled by 1 / world
        for rank in range(world):
            opt.zero_grad()
            for a in range(accum):
                rows = chunk[a, rank]
                (model(input_ids=rows, labels=rows).loss / accum).backward()
            per_rank.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            total = per_rank[0][i]
            for other in per_rank[1:]:
                total = total + other[i]
            p.grad = total * (1.0 / world)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ds_config(name, stage, dtype, accum):
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": accum,
            "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"},
            "optimizer": {"type": "slimopt." + TYPES[name], "params": dict(OPT_PARAMS[name])},
            "steps_per_print": 10 ** 9, "gradient_clipping": 0.0}


def train(engine, rank, world, accum, steps, start=0, gradients=None):
    """``steps`` optimizer steps; with a list ``gradients``, append DeepSpeed's averaged
    gradients of each step (``full_gradients``) as the optimizer is about to see them."""
    data = batches(world, accum)
    per_step = accum * world * MICRO
    for step in range(start, start + steps):
        chunk = data[step * per_step:(step + 1) * per_step].view(accum, world, MICRO, SEQ)
        for a in range(accum):
            rows = chunk[a, rank]
            loss = engine(input_ids=rows, labels=rows).loss
            engine.backward(loss)
            if gradients is not None and a == accum - 1:
                gradients.append(full_gradients(engine))
            engine.step()


def trainable(engine):
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def full_gradients(engine):
    """DeepSpeed's own averaged gradient of every trainable parameter, full size, in fp32, read
    through its public ``safe_get_full_grad`` (a collective under ZeRO-1/2/3): independent of
    slimopt's bridge and its map of the flat partitions."""
    from deepspeed.utils import safe_get_full_grad
    return {n: safe_get_full_grad(p).detach().float().clone() for n, p in trainable(engine)}


def masters(engine, stage):
    """The fp32 weights the optimizer steps, full size, by name: DeepSpeed's master copies
    (``safe_get_full_fp32_param``, a collective, under ZeRO-1/2/3; the bf16 wrapper's
    ``fp32_groups`` under ZeRO-0), or the parameters themselves in fp32 ZeRO-0."""
    named = trainable(engine)
    if stage >= 1:
        from deepspeed.utils import safe_get_full_fp32_param
        return {n: safe_get_full_fp32_param(p).detach().float().clone() for n, p in named}
    wrapper = engine.optimizer
    copies = {}
    if hasattr(wrapper, "fp32_groups"):  # ZeRO-0 with bf16: DeepSpeed's FP16_UnfusedOptimizer
        for low, high in zip(wrapper.fp16_groups, wrapper.fp32_groups):
            copies.update({id(lp): hp for lp, hp in zip(low, high)})
    return {n: copies.get(id(p), p).detach().float().clone() for n, p in named}


def replay(name, start, gradients):
    """The optimizer in one process, started from the engine's initial fp32 ``start`` weights
    and fed DeepSpeed's own ``gradients`` step by step: its weights are what the engine's
    masters must be if slimopt's bridge steps each matrix with the exact single-process rule.
    Same inputs, same operations: no rounding path of the machine enters the comparison."""
    from slimopt.launch.zero import build_from_config
    model = tiny_llama(name in LORA)
    opt = build_from_config({"type": "slimopt." + TYPES[name],
                             "params": dict(OPT_PARAMS[name])}, model)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, value in start.items():
            named[n].copy_(value)
    for step_gradients in gradients:
        for n, g in step_gradients.items():
            named[n].grad = g.clone()
        opt.step()
    return {n: named[n].detach().clone() for n in start}


def params_of(engine):
    """Full parameters on every rank (a collective under ZeRO-3, which partitions them)."""
    named = list(engine.module.named_parameters())
    if hasattr(named[0][1], "ds_id"):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().float().clone() for n, p in named}
    return {n: p.detach().float().clone() for n, p in named}


def max_diff(a, b):
    return max(float((a[n] - b[n].float()).abs().max()) for n in b)


def run_checkpoint(name, stage, tmp):
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, _, _, _ = initialize(model=tiny_llama(name in LORA),
                                 config=ds_config(name, stage, "fp32", 1))
    train(engine, rank, world, 1, 2)
    engine.save_checkpoint(tmp, tag="two")
    train(engine, rank, world, 1, 1, start=2)
    straight = params_of(engine)
    fresh, _, _, _ = initialize(model=tiny_llama(name in LORA),
                                config=ds_config(name, stage, "fp32", 1))
    fresh.load_checkpoint(tmp, tag="two")
    train(fresh, rank, world, 1, 1, start=2)
    if rank == 0:
        print(json.dumps({"scenario": f"ckpt:{name}:{stage}",
                          "max_diff": max_diff(params_of(fresh), straight)}), flush=True)


def run_naive(name, stage):
    import deepspeed
    rank, world = dist.get_rank(), dist.get_world_size()
    from slimopt.launch.zero import build_from_config
    model = tiny_llama(False)
    cfg = ds_config(name, stage, "fp32", 1)
    opt = build_from_config(cfg.pop("optimizer"), model)
    cfg["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    # what a naive integration does: treat the shards as parameters (ZeRO-3 swaps its flat
    # partitions into the groups only during the step)
    shards = [p for group in opt.param_groups for p in group["params"]]
    shards += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))
    for p in shards:
        if opt.param_key(p) is None:
            opt.adopt_key(p)
    start, gradients = masters(engine, stage), []
    train(engine, rank, world, 1, STEPS, gradients=gradients)
    end = masters(engine, stage)
    got = params_of(engine)
    if rank == 0:
        print(json.dumps({"scenario": f"naive:{name}:{stage}",
                          "max_diff": max_diff(got, reference(name, 1, world)),
                          "replay_diff": max_diff(replay(name, start, gradients), end)}),
              flush=True)


def ds_config_at(name, stage, world):
    """The config that gives the same global batch at ``world`` ranks as at 2 (accumulation
    makes up the missing ranks)."""
    return ds_config(name, stage, "fp32", 2 // world)


def run_reshard(phase, name, stage, folder):
    """save (2 ranks): 2 steps, checkpoint, 1 more step (the uninterrupted run);
    load (1 rank): the merged file from ``python -m slimopt.launch.zero_checkpoint``, checkpoint
    again at world size 1, 1 step; back (2 ranks): that world-size-1 checkpoint directly, 1 step.
    Prints the difference to the uninterrupted run."""
    from slimopt.launch import load_resharded
    from slimopt.launch.zero_checkpoint import main as convert
    rank, world = dist.get_rank(), dist.get_world_size()
    accum = 2 // world
    engine, _, _, _ = initialize(model=tiny_llama(name in LORA),
                                 config=ds_config_at(name, stage, world))
    if phase == "save":
        train(engine, rank, world, accum, 2)
        engine.save_checkpoint(os.path.join(folder, "w2"), tag="two")
        train(engine, rank, world, accum, 1, start=2)
        straight = params_of(engine)
        if rank == 0:
            torch.save(straight, os.path.join(folder, "straight.pt"))
        return
    if phase == "load":
        merged = os.path.join(folder, "merged.pt")
        assert convert([os.path.join(folder, "w2"), merged, "--tag", "two"]) == 0
        load_resharded(engine, merged)
        engine.save_checkpoint(os.path.join(folder, "w1"), tag="two")
    else:
        load_resharded(engine, os.path.join(folder, "w1"), tag="two")
    steps = engine.global_steps
    train(engine, rank, world, accum, 1, start=2)
    got = params_of(engine)
    if rank == 0:
        straight = torch.load(os.path.join(folder, "straight.pt"))
        label = "2to1" if phase == "load" else "1to2"
        print(json.dumps({"scenario": f"reshard-{label}:{name}:{stage}", "restored_steps": steps,
                          "max_diff": max_diff(got, straight)}), flush=True)


def _same(a, b) -> bool:
    """Equal nested state (tensors bit for bit)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def run_load_checks(name, stage, folder):
    """One rank (review row A233): the bridge's ``load_state_dict`` given rank 0's share of the
    2-rank checkpoint in ``folder``/w2 (from reshard-save), this engine's own state with one
    tensor of the wrong shape, and one with a parameter the optimizer does not have. Prints
    each error (or "accepted") and whether the optimizer's state stayed as it was; the
    engine's own state then loads."""
    import copy
    import glob
    from slimopt.launch.safe_load import load_file
    world = dist.get_world_size()
    engine, _, _, _ = initialize(model=tiny_llama(name in LORA),
                                 config=ds_config_at(name, stage, world))
    optimizer = engine.optimizer.optimizer
    train(engine, dist.get_rank(), world, 2 // world, 1)
    own = copy.deepcopy(optimizer.state_dict())
    first = sorted(glob.glob(os.path.join(folder, "w2", "two", "*_optim_states.pt")))[0]
    zero_state = load_file(first)["optimizer_state_dict"]
    share = zero_state.get("base_optimizer_state") or zero_state["optimizer_state_dict"]
    wrong = copy.deepcopy(own)
    entry = next(iter(wrong["state"].values()))
    tensor_key = next(k for k, v in entry.items() if torch.is_tensor(v))
    entry[tensor_key] = torch.zeros(entry[tensor_key].numel() + 1)
    foreign = copy.deepcopy(own)
    foreign["state"]["9999"] = next(iter(own["state"].values()))
    row = {"scenario": f"loadcheck:{name}:{stage}", "tensor_key": tensor_key}
    for label, state in (("share", share), ("wrong_shape", wrong), ("foreign", foreign)):
        before = copy.deepcopy(optimizer.state_dict())
        try:
            optimizer.load_state_dict(state)
            row[label] = "accepted"
        except ValueError as err:
            row[label] = str(err)
        row[f"{label}_unchanged"] = _same(before, optimizer.state_dict())
    optimizer.load_state_dict(own)
    row["own_reloaded"] = _same(own, optimizer.state_dict())
    print(json.dumps(row), flush=True)


def run_timing(name, stage, steps=6):
    """Seconds per ``engine.step()`` (the optimizer step with its communication; median over
    ``steps`` after 2 warm-up steps, slowest rank) for NAME through slimopt's bridge and for torch
    AdamW natively sharded by DeepSpeed, at ZeRO ``stage``, plus NAME in one process on the whole
    batch. A 4-layer LLaMA of hidden size 128 (about 0.5M parameters)."""
    import time
    import deepspeed
    rank = dist.get_rank()
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=4, max_position_embeddings=SEQ)
    rows = torch.randint(0, 256, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))

    def timed(engine_or_opt, model, use_engine):
        times = []
        for i in range(steps + 2):
            loss = (engine_or_opt if use_engine else model)(input_ids=rows, labels=rows).loss
            if use_engine:
                engine_or_opt.backward(loss)
            else:
                loss.backward()
            dist.barrier()
            t0 = time.perf_counter()
            engine_or_opt.step()
            if not use_engine:
                engine_or_opt.zero_grad()
            dist.barrier()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = torch.tensor([sorted(times)[len(times) // 2]])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    engine, _, _, _ = initialize(model=model, config=ds_config(name, stage, "fp32", 1))
    bridge = timed(engine, None, True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    cfg = ds_config(name, stage, "fp32", 1)
    del cfg["optimizer"]
    cfg["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=cfg)
    adamw = timed(engine, None, True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    from slimopt.launch.zero import build_from_config
    single = timed(build_from_config({"type": "slimopt." + TYPES[name],
                                      "params": dict(OPT_PARAMS[name])}, model), model, False)
    if rank == 0:
        print(json.dumps({"scenario": f"time:{name}:{stage}", "bridge_s": bridge,
                          "deepspeed_adamw_s": adamw, "single_process_s": single,
                          "params": sum(p.numel() for p in model.parameters())}), flush=True)


def run_gradient_probe(stage):
    """DeepSpeed's own gradients under ``stage`` vs ZeRO-0: plain SGD with lr 1 (an element-wise
    rule, so flat shards do not matter) moves each weight by exactly its averaged gradient."""
    import deepspeed
    rank, world = dist.get_rank(), dist.get_world_size()
    moved = {}
    for s in (0, stage):
        model = tiny_llama(False)
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "zero_optimization": {"stage": s},
               "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
               "steps_per_print": 10 ** 9}
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=cfg)
        before = params_of(engine)
        train(engine, rank, world, 1, 1)
        after = params_of(engine)
        moved[s] = {n: before[n] - after[n] for n in before}
    if rank == 0:
        scale = max(float(g.abs().max()) for g in moved[0].values())
        print(json.dumps({"scenario": f"grads:{stage}", "max_diff": max_diff(moved[stage], moved[0]),
                          "max_grad": scale}), flush=True)


def run_balance(stage):
    """Per-rank state bytes of GrassWalk under ZeRO-``stage`` on a 4-layer LLaMA of hidden size
    48 after one step, the bridge's plan of them (``planned_bytes``, None before the plan
    existed) and the single-process state bytes of the same optimizer."""
    from slimopt.launch.zero import build_from_config
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, opt, _, _ = initialize(model=tiny_llama(False, layers=4, hidden=48),
                                   config=ds_config("grasswalk", stage, "fp32", 1))
    rows = torch.randint(0, 64, (MICRO, SEQ), generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(input_ids=rows, labels=rows).loss)
    engine.step()
    mine = torch.tensor([float(slimopt.state_bytes(opt))], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, mine)
    single = build_from_config({"type": "slimopt." + TYPES["grasswalk"],
                                "params": dict(OPT_PARAMS["grasswalk"])},
                               tiny_llama(False, layers=4, hidden=48))
    single.init_state()
    planned = getattr(engine.optimizer.optimizer.step_router, "planned_bytes", None)
    if rank == 0:
        print(json.dumps({"scenario": f"balance:{stage}", "single": slimopt.state_bytes(single),
                          "state_bytes_per_rank": [int(x) for x in gathered],
                          "planned": planned}), flush=True)


def run_skip_slice(stage):
    """``nonfinite="skip"``: a NaN in rank 1's slice of an element-wise parameter that several
    ranks hold part of. Every rank must skip that whole parameter (its fp32 master unchanged,
    a skip counted on each rank holding a slice) and step the others, as one process would."""
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, _, _, _ = initialize(model=tiny_llama(False), config=ds_config("grasswalk", stage,
                                                                           "fp32", 1))
    train(engine, rank, world, 1, 1)
    client = engine.optimizer.optimizer
    bridge = client.step_router
    s, slot = next((s, slot) for s, dense in enumerate(bridge.dense) for slot in dense
                   if sum(n > 0 for n in bridge.shares(slot)) == world)
    name = {client.param_key(p): n for n, p in engine.module.named_parameters()}[slot.key]
    if rank == 1:
        piece = next(piece for piece in bridge.pieces[s] if piece.slot.key == slot.key)
        prepare = client._prepare_step

        def poisoned():  # DeepSpeed steps one group at a time: poison when it is ours
            if bridge.partition(s).grad is not None:
                bridge.partition(s).grad.view(-1)[piece.at] = float("nan")
            return prepare()
        client._prepare_step = poisoned
    before = masters(engine, stage)
    skips = client.nonfinite_skips()
    train(engine, rank, world, 1, 1, start=1)
    after = masters(engine, stage)
    counted = torch.tensor([float(client.nonfinite_skips() - skips)])
    dist.all_reduce(counted, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(json.dumps({"scenario": f"skipslice:{stage}", "param": name,
                          "skipped_change": float((after[name] - before[name]).abs().max()),
                          "others_change": min(float((after[n] - before[n]).abs().max())
                                               for n in before if n != name),
                          "min_skips_per_rank": float(counted)}), flush=True)


RESULTS = {}


def run(name, stage, dtype, accum):
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama(name in LORA)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    engine, opt, _, _ = initialize(model=model, config=ds_config(name, stage, dtype, accum))
    dtype_t = next(engine.module.parameters()).dtype
    init_moved = max_diff(params_of(engine), {n: v.to(dtype_t).float() for n, v in initial.items()})
    start, gradients = masters(engine, stage), []
    train(engine, rank, world, accum, STEPS, gradients=gradients)
    end = masters(engine, stage)
    state = slimopt.state_bytes(opt)
    inner = getattr(opt, "optimizer", opt)
    bridge = getattr(inner, "step_router", None)
    comm = None if bridge is None else {k: v // STEPS for k, v in bridge.communicated.items()}
    n_params = sum(p.numel() for p in engine.module.parameters() if p.requires_grad)
    got = params_of(engine)
    t = torch.tensor([state], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, t)
    if rank == 0:
        ref = reference(name, accum, world)
        diffs = {n: float((got[n] - ref[n].float()).abs().max()) for n in ref}
        if os.environ.get("ZERO_DEBUG"):
            print(sorted(diffs.items(), key=lambda kv: -kv[1])[:4], flush=True)
        diff = max(diffs.values())
        baseline = RESULTS.get((name, 0, dtype, accum))
        RESULTS[(name, stage, dtype, accum)] = got
        print(json.dumps({"scenario": f"{name}:{stage}:{dtype}:{accum}", "max_diff": diff,
                          "max_diff_vs_stage0": None if baseline is None else
                          max_diff(got, baseline),
                          "replay_diff": max_diff(replay(name, start, gradients), end),
                          "weights_vs_masters": max_diff(
                              got, {n: v.to(dtype_t) for n, v in end.items()}),
                          "init_moved": init_moved, "comm_elements_per_step": comm,
                          "trainable": n_params,
                          "state_bytes_per_rank": [int(x) for x in gathered]}), flush=True)


def run_nonfinite(stage, clip, where):
    """``nonfinite="raise"`` under ZeRO-``stage``: a NaN at the second step, in every rank's
    gradient (``where="loss"``: rank 1's loss is NaN, and averaging spreads it) or in rank 1's
    partition only (``"partition"``). Every rank must raise ``FloatingPointError`` (from the
    bridge's joint check, or after DeepSpeed discarded the step), no rank may hang, and the fp32
    masters must be those of the first step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ds_config("grasswalk", stage, "fp32", 1)
    cfg["optimizer"]["params"]["nonfinite"] = "raise"
    cfg["gradient_clipping"] = clip
    engine, _, _, _ = initialize(model=tiny_llama(False), config=cfg)
    train(engine, rank, world, 1, 1)
    before = masters(engine, stage)
    client = engine.optimizer.optimizer if stage >= 1 else engine.optimizer
    if where == "partition" and rank == 1:
        prepare = client._prepare_step

        def poisoned():
            for group in client.param_groups:
                if group["params"] and group["params"][0].grad is not None:
                    group["params"][0].grad.view(-1)[0] = float("nan")
                    break
            return prepare()
        client._prepare_step = poisoned
    rows = batches(world, 1)[world * MICRO:2 * world * MICRO].view(world, MICRO, SEQ)[rank]
    loss = engine(input_ids=rows, labels=rows).loss
    engine.backward(loss * float("nan") if where == "loss" and rank == 1 else loss)
    raised = 0.0
    try:
        engine.step()
    except FloatingPointError:
        raised = 1.0
    flags = torch.tensor([raised])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    change = max_diff(before, masters(engine, stage))  # a collective: every rank
    if rank == 0:
        print(json.dumps({"scenario": f"nonfinite:{stage}:{clip}:{where}",
                          "every_rank_raised": bool(flags.item()), "max_change": change}),
              flush=True)


if __name__ == "__main__":
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo")
    import tempfile
    for scenario in sys.argv[1:]:
        parts = scenario.split(":")
        if parts[0] == "ckpt":
            tmp = os.environ.get("ZERO_CKPT_DIR") or tempfile.mkdtemp()
            run_checkpoint(parts[1], int(parts[2]), os.path.join(tmp, scenario.replace(":", "-")))
        elif parts[0].startswith("reshard-"):
            folder = os.path.join(os.environ["ZERO_CKPT_DIR"], "-".join(parts))
            folder = folder.replace("reshard-load", "reshard").replace("reshard-save", "reshard")
            folder = folder.replace("reshard-back", "reshard")
            os.makedirs(folder, exist_ok=True)
            run_reshard(parts[0][len("reshard-"):], parts[1], int(parts[2]), folder)
        elif parts[0] == "loadcheck":
            run_load_checks(parts[1], int(parts[2]), os.path.join(
                os.environ["ZERO_CKPT_DIR"], f"reshard-{parts[1]}-{parts[2]}"))
        elif parts[0] == "time":
            run_timing(parts[1], int(parts[2]))
        elif parts[0] == "grads":
            run_gradient_probe(int(parts[1]))
        elif parts[0] == "nonfinite":
            run_nonfinite(int(parts[1]), float(parts[2]), parts[3])
        elif parts[0] == "skipslice":
            run_skip_slice(int(parts[1]))
        elif parts[0] == "balance":
            run_balance(int(parts[1]))
        elif parts[0] == "naive":
            run_naive(parts[1], int(parts[2]))
        else:
            run(parts[0], int(parts[1]), parts[2], int(parts[3]))
    # leave together and tear the process group down before the interpreter does (an abort at
    # exit otherwise turns a finished run into a failed one now and then)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
