"""Shared by ``tests/test_hf_trainer.py``, ``tests/test_accelerate.py`` and the HF workers: the
tiny LLaMA (hidden 32, 2 layers, vocab 128), a fixed token dataset, the slimopt optimizer and
``TrainingArguments`` both sides of a comparison use."""
import os

import torch
import transformers

import slimopt
from tiny_model import tiny_llama as base_llama

VOCAB, SEQ = 128, 8


def tiny_llama():
    return base_llama(layers=2, hidden=32, seq=SEQ, vocab=VOCAB, intermediate=64)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def grasswalk(model):
    return slimopt.GrassWalk(slimopt.param_groups(model, rank=4, update_interval=2), lr=1e-3)


def training_args(output_dir, steps, deepspeed=None, **kw):
    options = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                   learning_rate=1e-3, report_to="none", save_strategy="no", use_cpu=True,
                   logging_steps=1000, seed=0, data_seed=0, max_grad_norm=1.0,
                   disable_tqdm=True, dataloader_num_workers=0)
    options.update(kw)
    return transformers.TrainingArguments(deepspeed=deepspeed, **options)


def zero_config(stage=2):
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": False}, "fp16": {"enabled": False}}


def weights(model):
    return {n: p.detach().float().clone().cpu() for n, p in model.named_parameters()}


def optimizer_chain(opt):
    """Class names from the Trainer's optimizer down to the one that steps."""
    names = []
    while opt is not None:
        names.append(type(opt).__name__)
        opt = getattr(opt, "optimizer", None)
    return names


os.environ.setdefault("DS_ACCELERATOR", "cpu")


def schedule(opt, total=4):
    """Linear decay over ``total`` steps; ``total=None``: constant (accelerate steps a prepared
    scheduler once per process and optimizer step, so a multi-rank run decays faster than a
    one-process loop)."""
    if total is None:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (total + 1))


def hand_loop(model, opt, sched, loader, accumulation=2, max_norm=1.0):
    """The reference: what ``accelerate_loop`` does, written out."""
    for i, batch in enumerate(loader):
        (model(**batch).loss / accumulation).backward()
        if (i + 1) % accumulation == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            opt.step()
            sched.step()
            opt.zero_grad()


def accelerate_loop(accelerator, model, opt, sched, loader, max_norm=1.0):
    """Returns the number of optimizer steps taken (``sync_gradients``)."""
    steps = 0
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), max_norm)
                steps += 1
            opt.step()
            sched.step()
            opt.zero_grad()
    return steps


def loader(n=8):
    return torch.utils.data.DataLoader(Tokens(n), batch_size=2, shuffle=False)


def save_result(result, model, initial, out, final=None):
    """Finish a worker's ``result``: the state keys of its optimizer are set by the caller; here
    whether the weights moved from ``initial``, the final weights (``final`` if the caller
    gathered them, else read from ``model``), saved to ``out/result.pt``."""
    final = weights(model) if final is None else final
    result["changed"] = any(not torch.equal(initial[n], final[n]) for n in initial)
    result["weights"] = final
    torch.save(result, os.path.join(out, "result.pt"))
