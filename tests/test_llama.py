"""On a real (tiny) transformers LlamaForCausalLM: param_groups' split, and training close to AdamW."""
import pytest
import torch

import slimopt

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))


def markov_batches(steps, batch=16, seq=32, vocab=256, seed=0):
    """Token sequences from a fixed sparse random Markov chain: learnable structure, no download."""
    g = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = []
    for _ in range(steps):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        rows = [tok]
        for _ in range(seq - 1):
            pick = torch.randint(0, 4, (batch,), generator=g)
            tok = successors[tok, pick]
            rows.append(tok)
        out.append(torch.stack(rows, dim=1))
    return out


def test_param_groups_split_a_real_llama():
    model = tiny_llama()
    low, dense = slimopt.param_groups(model, rank=16, update_interval=50)
    names = {id(p): n for n, p in model.named_parameters()}
    low_names = sorted(names[id(p)] for p in low["params"])
    dense_names = sorted(names[id(p)] for p in dense["params"])
    assert low["rank"] == 16 and low["update_interval"] == 50
    assert dense["rank"] is None and dense["dense"] is True
    assert len(low_names) == 2 * 7
    assert all(n.split(".")[-2] in slimopt.param_groups.__globals__["PROJECTION_NAMES"]
               for n in low_names)
    assert any("embed_tokens" in n for n in dense_names) and any("norm" in n for n in dense_names)
    assert any("lm_head" in n for n in dense_names)
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in low["params"] + dense["params"]) == total


def test_param_groups_on_plain_modules():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8),
                                torch.nn.LayerNorm(8), torch.nn.Linear(8, 10))
    low, dense = slimopt.param_groups(model, rank=2)
    assert [p.shape for p in low["params"]] == [(8, 8), (10, 8)]
    dense_ids = {id(p) for p in dense["params"]}
    assert id(model[0].weight) in dense_ids and id(model[2].weight) in dense_ids
    with pytest.raises(ValueError, match="no nn.Linear"):
        slimopt.param_groups(model, rank=2, targets=("q_proj",))
    with pytest.raises(TypeError):
        slimopt.param_groups([torch.nn.Parameter(torch.ones(2, 2))], rank=2)


def _train(opt_factory, batches):
    model = tiny_llama()
    opt = opt_factory(model)
    losses = []
    for ids in batches:
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-5:]) / 5, losses[0], opt


@pytest.mark.parametrize("cls", [slimopt.GaLore, slimopt.SARA, slimopt.GrassJump,
                                 slimopt.GrassWalk])
def test_tiny_llama_trains_close_to_adamw(cls):
    batches = markov_batches(60)
    adamw_final, start, _ = _train(
        lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3), batches)
    final, start2, opt = _train(
        lambda m: cls(slimopt.param_groups(m, rank=16, update_interval=20), lr=3e-3), batches)
    assert start2 == pytest.approx(start)
    assert final < start - 0.5 * (start - adamw_final)  # at least half of AdamW's progress
    assert final < adamw_final * 1.15
    assert slimopt.state_bytes(opt) < 0.8 * 2 * 4 * sum(
        p.numel() for g in opt.param_groups for p in g["params"])


def test_param_groups_include_head_for_snsm():
    model = tiny_llama()
    low, dense = slimopt.param_groups(model, rank=16, include_head=True)
    assert any(p is model.lm_head.weight for p in low["params"])
    assert not any(p is model.lm_head.weight for p in dense["params"])
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG,
                                                                  tie_word_embeddings=True))
    low, dense = slimopt.param_groups(tied, rank=16, include_head=True)
    assert not any(p is tied.lm_head.weight for p in low["params"])
