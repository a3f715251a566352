"""The peer optimizers of the launcher and benchmarks: each builds from its package with the
GaLore split, trains, and a missing package is a clear error."""
import sys

import pytest
import torch
import transformers

from slimopt.launch.registry import PEERS, RANKED, build_optimizer


def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_trains_on_a_fixed_batch(name):
    model = tiny()
    options = {"update_interval": 5} if name in RANKED else {}
    opt = build_optimizer(name, model, lr=3e-3, rank=8, **options)
    x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 0.1, losses
    covered = {id(p) for g in opt.param_groups for p in g["params"]}
    assert covered == {id(p) for p in model.parameters()}


def test_missing_peer_package_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_optimizer", None)
    with pytest.raises(ValueError, match="pip install torch-optimizer"):
        build_optimizer("adafactor", tiny(), lr=1e-3)


def test_unknown_adamw_implementation():
    from slimopt.launch.peers import torch_adamw
    with pytest.raises(ValueError, match="implementation"):
        torch_adamw(tiny(), 1e-3, "cuda-graph")
