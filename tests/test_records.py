"""The method records (``slimopt.launch.records``): every optimizer ``slimopt`` exports has one,
every suite a record names really runs it, and what is derived from them agrees with them."""
import inspect

import pytest
import torch
import transformers

import slimopt
from slimopt.launch import records, registry

OURS = [m for m in records.METHODS if not m.is_peer]


def _exported_optimizers():
    objects = [getattr(slimopt, name) for name in slimopt.__all__]
    return [o for o in objects if inspect.isclass(o) and issubclass(o, torch.optim.Optimizer)]


def test_every_exported_optimizer_has_a_record():
    recorded = {m.build for m in OURS}
    missing = [cls.__name__ for cls in _exported_optimizers() if cls not in recorded]
    assert not missing, f"exported without a record in slimopt/launch/records.py: {missing}"
    assert _exported_optimizers()  # the check above is not vacuous


def test_records_are_well_formed():
    assert len(records.BY_NAME) == len(records.METHODS)  # one record per name
    suites = {records.CLI, records.DEEPSPEED, records.GENERIC, records.REFERENCE, records.ZERO,
              records.MEMORY, records.STEPTIME, records.CONVERGENCE}
    splits = {records.MATRICES, records.MATRICES_AND_HEAD, records.LORA_PAIRS, records.PEER_SPLIT}
    for m in records.METHODS:
        assert m.name == m.name.lower() and m.suites <= suites and m.split in splits, m
        assert (m.split == records.PEER_SPLIT) == m.is_peer, m
        assert m.fixed_rank is None or m.ranked, m
    assert len({m.display for m in records.in_suite(records.MEMORY)}) == \
        len(records.in_suite(records.MEMORY))  # distinct benchmark labels


def test_generic_registry_lists_exactly_the_generic_suite():
    from optimizer_registry import OPTIMIZERS
    assert {info.cls for info in OPTIMIZERS} == \
        {m.build for m in records.in_suite(records.GENERIC)}


def test_reference_cases_cover_the_reference_suite():
    from test_reference import CASES
    assert {case[0] for case in CASES} == {m.build for m in records.in_suite(records.REFERENCE)}


def test_zero_tests_run_the_zero_suite_at_every_stage():
    from test_zero import SCENARIOS
    for m in records.in_suite(records.ZERO):
        for stage in (0, 1, 2, 3):
            assert f"{m.name}:{stage}:fp32:1" in SCENARIOS


@pytest.mark.parametrize("method", records.in_suite(records.DEEPSPEED), ids=lambda m: m.name)
def test_deepspeed_names_find_the_record(method):
    assert method.deepspeed_name == "slimopt." + method.build.__name__
    for spelling in (method.deepspeed_name, method.deepspeed_name.lower(),
                     "slimopt." + method.name):
        assert records.from_deepspeed(spelling) is method


def test_galore_in_slimopts_namespace_is_ours():
    assert records.from_deepspeed("slimopt.GaLore").build is slimopt.GaLore
    assert records.BY_NAME["galore"].is_peer and records.from_deepspeed("slimopt.Adamz") is None


def test_cli_weight_decay_defaults():
    """The launcher sets weight decay 0.0 unless the command line gives one, except for the two
    peers that keep their package's default (Muon + AdamW 0.1, galore-torch 0.0)."""
    assert registry.cli_defaults("muon") == {} and registry.cli_defaults("GaLore") == {}
    for name in registry.KNOWN - {"muon", "galore"}:
        assert registry.cli_defaults(name) == {"weight_decay": 0.0}, name


def _tiny():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("name", sorted(registry.OPTIMIZERS))
def test_build_optimizer_applies_the_records_split(name):
    method = records.BY_NAME[name]
    model = _tiny()
    opt = registry.build_optimizer(name, model, lr=1e-3, rank=4)
    assert type(opt) is method.build
    matrix_group = opt.param_groups[0]
    head_in_matrices = any(p is model.lm_head.weight for p in matrix_group["params"])
    assert head_in_matrices == (method.split == records.MATRICES_AND_HEAD)
    assert matrix_group.get("rank") == (4 if method.ranked else None)
