"""PyTorch Lightning with a slimopt optimizer (issue 12): ``configure_optimizers`` returns
GrassWalk over ``slimopt.param_groups`` with a per-step cosine schedule; the ``Trainer`` runs
accumulation (2 batches per step), gradient clipping (norm 1.0) and bf16-mixed on CPU.

Checked: Lightning steps the GrassWalk instance itself (bases for the projections only), once per
2 batches; the weights equal a hand-written loop doing the same accumulation, clipping and schedule
exactly (0.0: the loop clips the parameters in the optimizer's group order, as Lightning does);
bf16-mixed trains; and ``fit(ckpt_path=...)`` from the step-2 checkpoint of
``ModelCheckpoint(every_n_train_steps=2)`` (2 steps an epoch, unshuffled loader: the checkpoint
falls on the last batch of epoch 0, and Lightning resumes at the start of epoch 1) equals the
uninterrupted run exactly, for GrassWalk as for torch AdamW, with the optimizer state loaded
tensor for tensor equal to the saved one.

Lightning 2.6's resume is exact only at such a boundary. ``ModelCheckpoint(every_n_epochs=1)``
with ``max_steps`` resumes by re-entering epoch 0 (one extra batch makes step 3 alone), and a
mid-epoch checkpoint replays the epoch's batches from the start (a plain DataLoader has no position
to restore): measured, 2.5e-3 (GrassWalk) vs 9.5e-4 (AdamW), and 4.9e-3 vs 2.3e-3 from step 1 --
a different data order, not the optimizer state."""
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")
L = pytest.importorskip("lightning")

import slimopt  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed"))
from tiny_model import tiny_llama as base_llama  # noqa: E402

VOCAB, SEQ, BATCH, STEPS, ACCUMULATION = 128, 8, 2, 4, 2


def tiny_llama():
    return base_llama(layers=2, hidden=32, seq=SEQ, vocab=VOCAB, intermediate=64)


def loader():
    """8 sequences, batches of 2, unshuffled: 4 batches an epoch = 2 optimizer steps; the 4 steps
    take 8 batches (2 epochs)."""
    ids = torch.randint(0, VOCAB, (BATCH * ACCUMULATION * 2, SEQ),
                        generator=torch.Generator().manual_seed(1))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=BATCH,
                                       shuffle=False)


def grasswalk(model):
    return slimopt.GrassWalk(slimopt.param_groups(model, rank=4, update_interval=2), lr=1e-3)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3)


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


class Module(L.LightningModule):
    def __init__(self, make_optimizer=grasswalk):
        super().__init__()
        self.model = tiny_llama()
        self.make_optimizer = make_optimizer
        self.batches = 0
        self.losses = []

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        self.batches += 1
        self.losses.append(loss.detach().float().item())
        return loss

    def configure_optimizers(self):
        opt = self.make_optimizer(self.model)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": cosine(opt), "interval": "step"}}


def trainer(tmp=None, precision="32-true", callbacks=()):
    checkpoint = ([L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp, every_n_train_steps=2,
                                                        save_top_k=-1, save_last=False)]
                  if tmp is not None else [])
    return L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS,
                     accumulate_grad_batches=ACCUMULATION, gradient_clip_val=1.0, logger=False,
                     enable_checkpointing=tmp is not None, enable_progress_bar=False,
                     enable_model_summary=False, precision=precision,
                     callbacks=checkpoint + list(callbacks))


def fit(module, tmp=None, ckpt_path=None, precision="32-true", callbacks=()):
    t = trainer(tmp, precision, callbacks)
    t.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return t


def weights(model):
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def max_diff(a, b):
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """GrassWalk under Lightning, 4 steps, a checkpoint every 2 steps (an epoch's last batch)."""
    tmp = tmp_path_factory.mktemp("grasswalk")
    module = Module()
    t = fit(module, tmp)
    return module, t, tmp


def hand_loop(model, opt, sched):
    """What Lightning's automatic optimization does with accumulation 2 and norm clipping: the
    loss divided by 2, the gradients clipped over the optimizer's parameters in group order."""
    params = [p for group in opt.param_groups for p in group["params"]]
    batches = steps = 0
    for _epoch in range(STEPS // 2):
        for i, (ids,) in enumerate(loader()):
            (model(input_ids=ids, labels=ids).loss / ACCUMULATION).backward()
            batches += 1
            if (i + 1) % ACCUMULATION == 0:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad()
                sched.step()
                steps += 1
    return batches, steps


def test_lightning_steps_grasswalk_once_per_accumulation(uninterrupted):
    module, t, _ = uninterrupted
    opt = t.optimizers[0]
    assert type(opt) is slimopt.GrassWalk
    assert t.lr_scheduler_configs[0].interval == "step"
    names = {id(p): n for n, p in module.model.named_parameters()}
    with_basis = {names[id(p)] for p, s in opt.state.items() if "basis" in s}
    projections = {n for n, p in module.model.named_parameters()
                   if p.dim() == 2 and n.endswith("_proj.weight")}
    assert with_basis == projections and len(projections) == 14
    assert "model.embed_tokens.weight" not in with_basis and "lm_head.weight" not in with_basis
    assert module.batches == STEPS * ACCUMULATION == 8
    assert t.global_step == STEPS
    assert {s["step"] for s in opt.state.values()} == {STEPS}


def test_lightning_equals_hand_loop(uninterrupted):
    module, t, _ = uninterrupted
    model = tiny_llama()
    opt = grasswalk(model)
    sched = cosine(opt)
    assert hand_loop(model, opt, sched) == (8, STEPS)
    assert sched.get_last_lr() == t.lr_scheduler_configs[0].scheduler.get_last_lr()
    diff = max_diff(weights(model), weights(module.model))
    assert diff == 0.0, diff


def test_lightning_bf16_mixed_trains():
    module = Module()
    before = weights(module.model)
    t = fit(module, precision="bf16-mixed")
    assert type(t.optimizers[0]) is slimopt.GrassWalk
    assert len(module.losses) == 8 and all(torch.isfinite(torch.tensor(module.losses)))
    assert max_diff(before, weights(module.model)) > 1e-4
    assert {s["step"] for s in t.optimizers[0].state.values()} == {STEPS}


class CaptureLoadedState(L.Callback):
    """The optimizer state right after Lightning restored the checkpoint (before any step)."""

    def on_train_start(self, trainer, module):
        self.state = trainer.optimizers[0].state_dict()
        self.state = {"state": {k: {n: v.clone() if torch.is_tensor(v) else v
                                    for n, v in s.items()}
                                for k, s in self.state["state"].items()},
                      "param_groups": [dict(g) for g in self.state["param_groups"]]}
        self.global_step = trainer.global_step


def assert_same_state(loaded, saved):
    assert loaded["state"].keys() == saved["state"].keys() and loaded["state"]
    for k in saved["state"]:
        a, b = loaded["state"][k], saved["state"][k]
        assert a.keys() == b.keys()
        for n in b:
            if torch.is_tensor(b[n]):
                assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), (k, n)
            else:
                assert a[n] == b[n], (k, n)
    assert len(loaded["param_groups"]) == len(saved["param_groups"])
    for a, b in zip(loaded["param_groups"], saved["param_groups"]):
        assert a["params"] == b["params"] and a["lr"] == b["lr"]


def resume_gap(make_optimizer, full_module, tmp):
    """Resume from the step-2 checkpoint (epoch 0's last batch) and run to step 4: the largest
    weight difference from the uninterrupted run, with the loaded optimizer state checked against
    the saved one."""
    ckpt = tmp / "epoch=0-step=2.ckpt"
    assert ckpt.exists(), sorted(p.name for p in tmp.iterdir())
    saved = torch.load(ckpt, weights_only=False)  # our own file
    capture = CaptureLoadedState()
    resumed = Module(make_optimizer)
    t = fit(resumed, ckpt_path=str(ckpt), callbacks=[capture])
    assert capture.global_step == 2 and t.global_step == STEPS
    assert resumed.batches == 4  # the second epoch only: no batch repeated or skipped
    assert_same_state(capture.state, saved["optimizer_states"][0])
    assert type(t.optimizers[0]) is type(make_optimizer(tiny_llama()))
    return max_diff(weights(full_module.model), weights(resumed.model))


def test_lightning_resume_equals_uninterrupted_grasswalk_and_adamw(uninterrupted, tmp_path):
    module, _, tmp = uninterrupted
    slim = resume_gap(grasswalk, module, tmp)
    adam_full = Module(adamw)
    fit(adam_full, tmp_path)
    adam = resume_gap(adamw, adam_full, tmp_path)
    assert (slim, adam) == (0.0, 0.0)
