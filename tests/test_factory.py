"""``slimopt.create_optimizer`` / ``list_optimizers`` (every slimopt method in the records, by
launcher or class name) and ``slimopt.HFOptimizerFactory`` under a real HF ``Trainer``."""
import pytest
import torch

import slimopt
from slimopt.launch import records

transformers = pytest.importorskip("transformers")

OURS = [m for m in records.METHODS if not m.is_peer]


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4,
                                      vocab_size=128)
    return transformers.LlamaForCausalLM(config)


def _step(model, opt):
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_list_optimizers_is_slimopts_own_methods():
    assert slimopt.list_optimizers() == [m.name for m in OURS]
    assert "adamw" not in slimopt.list_optimizers() and "grasswalk" in slimopt.list_optimizers()


@pytest.mark.parametrize("method", OURS, ids=lambda m: m.name)
def test_create_optimizer_builds_and_steps_every_method(method):
    model = _llama()
    if method.split == records.LORA_PAIRS:
        slimopt.lora.apply_lora(model, rank=2)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    opt = slimopt.create_optimizer(model, method.name, lr=1e-2, rank=4)
    assert type(opt) is method.build
    _step(model, opt)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    if method.split == records.LORA_PAIRS:
        return
    matrix, dense = opt.param_groups
    head_in = method.split == records.MATRICES_AND_HEAD
    assert len(matrix["params"]) == 14 + head_in
    assert ("lm_head.weight" in matrix["param_names"]) == head_in
    assert "model.embed_tokens.weight" in dense["param_names"] and dense["dense"] is True
    if method.ranked:
        assert matrix["rank"] == 4 and dense["rank"] is None


@pytest.mark.parametrize("name", ["GrassWalk", "GRASSWALK", "grass_walk", "GaLore",
                                  "galore-slimopt", "Galore_Slimopt"])
def test_names_any_case_launcher_or_class(name):
    opt = slimopt.create_optimizer(_llama(), name, rank=4)
    assert type(opt).__name__ in ("GrassWalk", "GaLore")
    assert opt.param_groups[0]["lr"] == 1e-3  # the class default


def test_unknown_name_lists_the_optimizers():
    with pytest.raises(ValueError) as err:
        slimopt.create_optimizer(_llama(), "adamw")  # a peer, not slimopt's
    for name in slimopt.list_optimizers():
        assert name in str(err.value)
    with pytest.raises(ValueError, match="grasswalk"):
        slimopt.HFOptimizerFactory("nonesuch")


def test_create_optimizer_passes_targets_and_options():
    model = _llama()
    with pytest.warns(UserWarning, match="holds 4 of the model's 14"):
        opt = slimopt.create_optimizer(model, "grasswalk", lr=1e-3, rank=4,
                                       targets="re:(q|v)_proj$", update_interval=7)
    assert len(opt.param_groups[0]["params"]) == 4
    assert opt.param_groups[0]["update_interval"] == 7
    with pytest.raises(ValueError, match="LoRA"):
        slimopt.create_optimizer(model, "adaprelora", targets=["q_proj"])


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=8, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_with_the_factory(tmp_path):
    model = _llama()
    start = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=3,
        per_device_train_batch_size=2, save_strategy="no", logging_strategy="no",
        disable_tqdm=True, learning_rate=1e-3)
    factory = slimopt.HFOptimizerFactory("grasswalk", update_interval=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizer_cls_and_kwargs=(factory, {"lr": 1e-3, "rank": 4}))
    trainer.train()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert type(opt) is slimopt.GrassWalk
    matrix, dense = opt.param_groups
    assert matrix["rank"] == 4 and matrix["update_interval"] == 2
    assert len(matrix["params"]) == 14
    assert all(n.split(".")[-2].endswith("_proj") for n in matrix["param_names"])
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(dense["param_names"])
    assert dense["rank"] is None and dense.get("dense") is True
    q = model.model.layers[0].self_attn.q_proj.weight
    assert "basis" in opt.state[q] and opt.state[q]["step"] == 3
    assert "basis" not in opt.state[model.model.embed_tokens.weight]
    assert not torch.equal(q.detach(), start)


def test_factory_protocol():
    factory = slimopt.HFOptimizerFactory("SNSM", rank=4)
    assert factory() is factory  # transformers instantiates the factory first
    assert "snsm" in repr(factory)
    with pytest.raises(TypeError, match="model is missing"):
        factory(lr=1e-3)
