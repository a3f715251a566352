"""FSDP2 (``fully_shard``, gloo, CPU ranks) with every slimopt optimizer built the ordinary way on
the DTensor parameters: exact single-process math (replay and end to end), gradient accumulation,
bf16 mixed precision, the negative control, torch.distributed.checkpoint across world sizes
2 -> 1 -> 2, per-rank state on 4 ranks against the plan, and the refusals.
``tests/distributed/fsdp_worker.py`` does the work; each torchrun runs many scenarios."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from net import free_port

# found, not imported: peft imports triton, which must first see TRITON_INTERPRET=1, set when
# tests/test_kernels.py is collected (after this module)
if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None:
    pytest.skip("the FSDP2 workers need transformers and peft", allow_module_level=True)

from slimopt.launch import records  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed", "fsdp_worker.py")
OPTIMIZERS = [m.name for m in records.in_suite(records.ZERO)]
# Tolerances. The replay (the sharded run against the optimizer run in one process on FSDP2's
# own gradients, from the same weights after every step) has the same inputs and operations on
# the owner, so it is 0.0 by construction; end to end in fp32 the gradient is formed as FSDP2
# forms it (each rank's half, summed, times 1/2: commutative and exact), so it is 0.0 too
# (measured 0.0 for all). FP32_TOL is slack only for a BLAS kernel whose rounding depends on
# memory alignment: 1e-6 is 8 fp32 spacings of the largest weights here (|w| <= 1), far below
# any change of the rule (the negative control moves 0.06). bf16 mixed precision and
# accumulation are held to the replay: no rounding bound carries end to end through an
# Adam-type step, which is lr * sign(g) for gradient entries near zero (see tests/test_zero.py).
FP32_TOL = 1e-6
NAIVE_MIN = 1e-3
RUNS = ([f"run:{o}:fp32:1" for o in OPTIMIZERS]
        + ["run:grasswalk:fp32:2", "run:adaprelora:fp32:2", "run:root:fp32:2",
           "run:grasswalk:bf16:1", "run:adaprelora:bf16:1", "run:subsetnorm:bf16:2",
           "naive:grasswalk", "refuse", "nonfinite:skip", "nonfinite:raise"])
BALANCE = ["balance:grasswalk", "balance:subsetnorm", "balance:snsm", "balance:root"]


def torchrun(nproc, scenarios, env=None, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", WORKER, *scenarios]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-6000:])
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row.pop("scenario"): row for row in rows}


@pytest.fixture(scope="module")
def runs():
    return torchrun(2, RUNS)


@pytest.mark.parametrize("scenario", [s for s in RUNS if s.startswith("run:")])
def test_fsdp2_matches_one_process(runs, scenario):
    row = runs[scenario]
    assert row["moved"] > 10 * FP32_TOL, row  # the optimizer did train
    assert row["replay_diff"] <= FP32_TOL, row
    if ":fp32:1" in scenario:
        assert row["e2e_diff"] <= FP32_TOL, row


@pytest.mark.parametrize("name", ["grasswalk", "subsetnorm", "root"])
def test_communication_per_step_is_counted(runs, name):
    """Per matrix of N elements and step, each of the W ranks sends its N/W piece of the values
    and of the gradient to the owner and gets its N/W piece of the new values back: 3 M elements
    over all ranks (4 bytes each in fp32), 3 M / W per rank on average, M the matrices' elements
    (every piece here is N/W exactly)."""
    row = runs[f"run:{name}:fp32:1"]
    assert row["sent_bytes_per_step"] == 3 * row["matrix_elements"] * 4, row


def test_every_method_of_the_suite_runs_under_fsdp2(runs):
    assert {s.split(":")[1] for s in runs if s.startswith("run:")} == set(OPTIMIZERS)
    assert len(OPTIMIZERS) == 9


def test_rule_on_local_shards_is_another_method(runs):
    """Negative control: the same optimizer on each rank's shards as if they were parameters."""
    assert runs["naive:grasswalk"]["naive_diff"] > NAIVE_MIN


def test_nonfinite_shard_is_decided_for_the_whole_parameter_on_every_rank(runs):
    """A NaN in the last rank's shard of a matrix's and a norm's gradient: "skip" leaves both
    unchanged everywhere (rank 0 reports; it holds neither NaN) and trains the rest; "raise"
    raises on every rank (no rank left waiting in a collective) with nothing changed."""
    skip, raise_ = runs["nonfinite:skip"], runs["nonfinite:raise"]
    assert not skip["raised"] and skip["poisoned_changed"] == [] and skip["others_changed"] > 0
    assert raise_["raised"] and raise_["poisoned_changed"] == [] and raise_["others_changed"] == 0


def test_unsupported_layouts_are_refused_at_construction(runs):
    assert runs["refuse"] == {"tensor-parallel": "refused", "replicated": "refused",
                              "mixed": "refused"}


@pytest.mark.parametrize("name", ["grasswalk", "adaprelora"])
def test_dcp_checkpoint_moves_2_to_1_to_2_ranks_exactly(tmp_path, name):
    env = {"FSDP_CKPT_DIR": str(tmp_path)}
    torchrun(2, [f"dcp:a:{name}"], env)
    one = torchrun(1, [f"dcp:b:{name}"], env)[f"dcp:b:{name}"]
    assert one["refused"], "one rank's plain state_dict() loaded at another world size"
    back = torchrun(2, [f"dcp:c:{name}"], env)[f"dcp:c:{name}"]
    assert back["resume_diff"] <= FP32_TOL, back
    assert back["steps"] == [6], back


def test_per_rank_state_is_balanced_on_4_ranks():
    """State bytes per rank, measured with slimopt.state_bytes (local shards), equal the plan
    and stay within 1.1x of the mean; together they hold the single-process state."""
    rows = torchrun(4, BALANCE)
    for scenario, row in rows.items():
        per_rank = row["per_rank"]
        assert per_rank == row["planned"], (scenario, row)
        assert max(per_rank) <= 1.1 * sum(per_rank) / len(per_rank), (scenario, row)
        assert sum(per_rank) == row["single"], (scenario, row)
    grasswalk = rows["balance:grasswalk"]
    assert max(grasswalk["per_rank"]) <= 0.26 * grasswalk["adamw"] / 4, grasswalk


ONE_RANK_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import slimopt
dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
fully_shard(model)
opt = slimopt.GrassWalk([dict(params=[model[0].weight, model[2].weight], rank=4),
                         dict(params=[model[0].bias, model[2].bias], dense=True)], lr=1e-3)
try:
    opt.add_param_group(dict(params=[torch.nn.Parameter(torch.randn(3, 3))]))
    print("accepted")
except TypeError as err:
    print("refused" if "fully_shard" in str(err) else err)
print(len(opt.param_groups))
model(torch.randn(4, 16)).sum().backward()
opt.step()
print(slimopt.state_bytes(opt))
dist.destroy_process_group()
"""


def test_one_rank_fsdp2_refuses_a_plain_group_and_counts_local_state():
    """At world 1 (one rank holds everything): a plain-tensor group added to an FSDP2 optimizer
    is refused and rolled back; state_bytes counts the DTensor state (no crash on the subclass)
    and equals the same optimizer's state in one process."""
    proc = subprocess.run([sys.executable, "-c", ONE_RANK_SCRIPT], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    refused, groups, nbytes = proc.stdout.split()
    assert (refused, groups) == ("refused", "2")
    import torch
    import slimopt
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    reference = slimopt.GrassWalk([dict(params=[plain[0].weight, plain[2].weight], rank=4),
                                   dict(params=[plain[0].bias, plain[2].bias], dense=True)],
                                  lr=1e-3)
    reference.init_state()
    assert int(nbytes) == slimopt.state_bytes(reference)
