"""Which parameters ``slimopt.param_groups`` puts in the matrix group: HF ``Conv1D`` (GPT-2), fused
projections (Phi-3), ``targets`` as suffixes, regexes and ``"all-linear"``, embeddings and heads
found by type and by tying, the coverage warning, and torch's ``param_names``."""
import io
import re
import warnings

import pytest
import torch
from torch import nn

import slimopt
from slimopt.param_groups import PROJECTION_NAMES

transformers = pytest.importorskip("transformers")


def _names(group):
    return group["param_names"]


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128,
                                     n_positions=32, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _phi3():
    torch.manual_seed(0)
    config = transformers.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4,
                                     vocab_size=128, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2)
    return transformers.Phi3ForCausalLM(config)


def _llama(tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      vocab_size=128, tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config)


def _split(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these splits may warn
        return slimopt.param_groups(model, rank=4, **kw)


def test_gpt2_conv1d_weights_take_the_matrix_rule():
    model = _gpt2()
    low, dense = _split(model)
    assert len(low["params"]) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in 2 layers
    assert all(re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", n) for n in _names(low))
    conv1d = transformers.pytorch_utils.Conv1D
    assert {id(m.weight) for m in model.modules() if isinstance(m, conv1d)} == \
        {id(p) for p in low["params"]}
    # wte (tied to lm_head) and wpe are dense; the transposed (in, out) weights are plain 2-D
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(_names(dense))
    assert model.transformer.h[0].mlp.c_fc.weight.shape == (32, 128)


def test_gpt2_trains_with_grasswalk():
    model = _gpt2()
    opt = slimopt.GrassWalk(slimopt.param_groups(model, rank=4, update_interval=2), lr=1e-2)
    ids = torch.randint(0, 128, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    state = opt.state[model.transformer.h[0].attn.c_attn.weight]
    assert "basis" in state
    assert "basis" not in opt.state[model.transformer.wte.weight]


def test_phi3_fused_projections_take_the_matrix_rule():
    low, dense = _split(_phi3())
    tails = sorted({n.split(".")[-2] for n in _names(low)})
    assert tails == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert len(low["params"]) == 8
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(_names(dense))


def test_llama_default_is_the_seven_projections():
    low, dense = _split(_llama())
    assert {n.split(".")[-2] for n in _names(low)} == set(PROJECTION_NAMES)
    assert len(low["params"]) == 14
    assert "lm_head.weight" in _names(dense)


@pytest.mark.parametrize("targets", ["re:self_attn\\.(q|v)_proj$",
                                     re.compile(r"self_attn\.(q|v)_proj$")])
def test_regex_targets(targets):
    with pytest.warns(UserWarning, match="holds 4 of the model's 14"):
        low, _ = slimopt.param_groups(_llama(), rank=4, targets=targets)
    assert sorted(_names(low)) == sorted(f"model.layers.{i}.self_attn.{x}_proj.weight"
                                         for i in range(2) for x in "qv")


def test_regex_on_full_names_picks_layers():
    low, _ = _split(_llama(), targets="re:^model\\.layers\\.1\\.")
    assert len(low["params"]) == 7 and all(n.startswith("model.layers.1.") for n in _names(low))


@pytest.mark.parametrize("targets", ["all-linear", "all_linear", "ALL-LINEAR"])
def test_all_linear_targets(targets):
    low, dense = _split(_phi3(), targets=targets)
    assert len(low["params"]) == 8
    assert "lm_head.weight" in _names(dense)


def test_suffix_targets_dotted_and_single_string():
    low, _ = slimopt.param_groups(_gpt2(), targets=["attn.c_attn", "mlp.c_proj"])
    assert len(low["params"]) == 4
    with pytest.warns(UserWarning, match="holds 2 of the model's 8"):
        low, _ = slimopt.param_groups(_gpt2(), targets="c_fc")
    assert len(low["params"]) == 2


def test_tied_head_stays_dense_even_with_include_head():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    low, dense = _split(model, include_head=True)
    assert len(low["params"]) == 14
    assert id(model.lm_head.weight) in {id(p) for p in dense["params"]}
    with pytest.warns(UserWarning, match="holds 2 of"):  # tied head: never the matrix rule
        low, _ = slimopt.param_groups(model, targets=["lm_head", "q_proj"])
    assert len(low["params"]) == 2


def test_untied_head_with_include_head():
    model = _llama()
    low, _ = _split(model, include_head=True)
    assert _names(low)[-1] == "lm_head.weight" and len(low["params"]) == 15


class _TiedNet(nn.Module):
    """No HF getters: the head is found because its weight is the embedding's."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.body(self.emb(x)))


def test_head_tied_by_weight_is_dense_without_getters():
    model = _TiedNet()
    low, dense = _split(model)
    assert _names(low) == ["body.0.weight", "body.1.weight"]
    assert "emb.weight" in _names(dense)


def test_warning_when_most_linears_are_left_dense():
    model = _phi3()  # the LLaMA names match o_proj and down_proj only: half of 8 is not fewer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        slimopt.param_groups(model, targets=("o_proj", "down_proj"))
    with pytest.warns(UserWarning, match="holds 2 of the model's 8 linear weights") as rec:
        low, _ = slimopt.param_groups(model, targets=("o_proj",))
    message = str(rec[0].message)
    assert rec[0].filename == __file__  # points at the caller of param_groups
    assert "qkv_proj" in message and "gate_up_proj" in message and "targets=" in message
    assert len(low["params"]) == 2


def test_empty_matrix_group_warns_by_default_and_raises_with_targets():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4))
    with pytest.warns(UserWarning, match="matrix group is empty"):
        low, dense = slimopt.param_groups(model)
    assert low["params"] == [] and len(dense["params"]) == 3
    with pytest.raises(ValueError, match="no nn.Linear"):
        slimopt.param_groups(_gpt2(), targets=["q_proj"])
    with pytest.raises(TypeError, match="targets must be"):
        slimopt.param_groups(_gpt2(), targets=[3])


def test_param_names_follow_torch_and_round_trip():
    model = _llama()
    groups = slimopt.param_groups(model, rank=4)
    named = dict(model.named_parameters())
    for group in groups:
        assert [named[n] for n in group["param_names"]] == group["params"]
    assert sum(len(g["params"]) for g in groups) == len(named)
    opt = slimopt.GrassWalk(groups, lr=1e-3, update_interval=2)
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = slimopt.GrassWalk(slimopt.param_groups(model, rank=4), lr=1e-3, update_interval=2)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.param_groups[0]["param_names"] == groups[0]["param_names"]
    fresh.step()
    assert slimopt.param_groups(model, names=False)[0].keys() == {"params"}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_one_line_swap_with_names_keeps_embeddings_and_head_dense():
    """``GrassWalk(model.named_parameters())``: the embedding and the head take AdamW (GaLore's
    and transformers' convention), told by name; the projections take the matrix rule. Without
    names every 2-D tensor takes it, as before."""
    model = _llama()
    opt = slimopt.GrassWalk(model.named_parameters(), lr=1e-3, rank=4)
    assert opt.param_groups[-1]["dense"] is True
    assert opt.param_groups[-1]["param_names"] == ["model.embed_tokens.weight", "lm_head.weight"]
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert "basis" not in opt.state[model.lm_head.weight]
    assert "basis" not in opt.state[model.model.embed_tokens.weight]
    assert "basis" in opt.state[model.model.layers[0].self_attn.q_proj.weight]
    unnamed = slimopt.GrassWalk(model.parameters(), lr=1e-3, rank=4)
    assert len(unnamed.param_groups) == 1
    explicit = slimopt.GrassWalk([{"params": list(model.named_parameters()), "rank": 4}], lr=1e-3)
    assert len(explicit.param_groups) == 1  # a group that sets rank is the user's split


@pytest.mark.parametrize("name, expected", [
    ("model.embed_tokens.weight", True), ("lm_head.weight", True), ("transformer.wte.weight", True),
    ("transformer.wpe.weight", True), ("gpt_neox.embed_in.weight", True),
    ("embed_out.weight", True), ("shared.weight", True), ("output.weight", True),
    ("model.layers.0.self_attn.q_proj.weight", False), ("transformer.h.0.attn.c_attn.weight", False),
    ("model.layers.0.mlp.down_proj.weight", False)])
def test_embedding_and_head_names(name, expected):
    from slimopt.optimizers.core.naming import is_embedding_or_head
    assert is_embedding_or_head(name) is expected
