"""What a ``slimopt-pretrain`` run reports: TensorBoard scalars (loss, lr, gradient norm, tokens/s,
optimizer-state bytes, subspace movement and recovery norms, eval loss and perplexity), the
progress bar, the console lines, the loss curve and the final ``result.json``."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from ..state_bytes import state_bytes


class SubspaceDiagnostics:
    """How far each low-rank basis moved at its last change (``1 - ||S_old^T S_new||_F^2 / r``:
    0 = same subspace, 1 = orthogonal) and the mean recovery norm, read from the optimizer."""

    def __init__(self):
        self.previous = {}

    def collect(self, opt) -> dict:
        if not hasattr(opt, "current_basis"):
            return {}
        moves, recovery = [], []
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state.get(p, {})
                norm = float(state.get("recovery_norm", -1.0))  # a device scalar: read at logging
                if norm >= 0:  # -1: no step with recovery yet
                    recovery.append(norm)
                if not state or state.get("step", 0) == 0 or not opt.takes_matrix_rule(p, group):
                    continue
                position = state["step"] - 1 + opt.refresh_offset(group, state)
                if state["step"] > 1 and position % group["update_interval"] != 0:
                    continue  # the last step found no new basis (the first one always does)
                basis = opt.current_basis(p).float()
                old = self.previous.get(id(p))
                if old is not None:
                    overlap = float((old.T @ basis).square().sum()) / basis.shape[1]
                    moves.append(1.0 - overlap)
                self.previous[id(p)] = basis.clone()
        out = {}
        if moves:
            out["optimizer/subspace_move"] = sum(moves) / len(moves)
        if recovery:
            out["optimizer/recovery_norm"] = sum(recovery) / len(recovery)
        return out


def adamw_state_bytes(config) -> int:
    """What torch's AdamW would hold for this model: counted on the meta device."""
    import transformers
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    opt.step()
    return state_bytes(opt)


def curve_point(step, args, loss_sum, loss_count, eval_loss) -> dict:
    """One point of the result's ``curve``: the step, the tokens trained on up to it (global batch
    x sequence length x step, counted from step 0 also in a resumed run), the mean training loss
    over the steps since the previous point (None if none ran in this process) and the eval
    loss."""
    return {"step": step, "tokens": step * args.batch_size * args.seq_len,
            "train_loss": loss_sum / loss_count if loss_count else None, "eval_loss": eval_loss}


class RunLogger:
    """TensorBoard (rank 0, unless ``--no-tensorboard``), the progress bar (rank 0, unless
    ``--no-progress``) and the loss curve (``curve`` in the result: one point per evaluation;
    train_loss is the mean training loss over the steps since the previous point, tokens the
    global count at the step)."""

    def __init__(self, run, start: int):
        self.run, self.args, self.say = run, run.args, run.say
        self.writer = self._writer() if run.is_main and not self.args.no_tensorboard else None
        self.progress = None
        if run.is_main and not self.args.no_progress:
            try:
                from tqdm import tqdm
                self.progress = tqdm(total=self.args.steps, initial=start,
                                     desc=self.args.optimizer, unit="step")
            except ImportError:
                pass
        self.diagnostics = SubspaceDiagnostics()
        self.tokens_seen, self.t0, self.eval_loss, self.loss = 0, time.time(), None, None
        self.curve, self.loss_sum, self.loss_count = [], 0.0, 0

    def _writer(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
            return SummaryWriter(os.path.join(self.args.output_dir, "tb"))
        except ImportError:
            self.say("tensorboard not installed: no TensorBoard logs (pip install tensorboard)")
            return None

    def log_step(self, step, loss, grad_norm, tokens) -> None:
        """After ``step`` (counted from 1): ``loss`` averaged over the ranks, ``tokens`` trained
        on in it by all ranks."""
        self.tokens_seen += tokens
        self.loss, self.loss_sum, self.loss_count = loss, self.loss_sum + loss, self.loss_count + 1
        rate = self.tokens_seen / max(time.time() - self.t0, 1e-9)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        writer, opt = self.writer, self.run.opt
        if writer is None:
            return
        if step % self.args.log_every == 0 or step == self.args.steps:
            writer.add_scalar("train/loss", loss, step)
            writer.add_scalar("train/lr", self.run.sched.get_last_lr()[0], step)
            writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/tokens_per_s", rate, step)
            writer.add_scalar("optimizer/state_bytes", state_bytes(opt), step)
        for key, value in self.diagnostics.collect(opt).items():
            writer.add_scalar(key, value, step)

    def add_point(self, step, eval_loss) -> None:
        """A point of the loss curve at ``step``, with the eval loss there."""
        self.eval_loss = eval_loss
        self.curve.append(curve_point(step, self.args, self.loss_sum, self.loss_count, eval_loss))
        self.loss_sum, self.loss_count = 0.0, 0

    def log_eval(self, step, eval_loss) -> None:
        self.add_point(step, eval_loss)
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", eval_loss, step)
            self.writer.add_scalar("eval/perplexity", math.exp(min(eval_loss, 50)), step)
        if self.progress is None:
            self.say(f"step {step}: train loss {self.loss:.4f}, eval loss {eval_loss:.4f}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()

    def report(self) -> dict:
        """The result: printed, written to ``OUTPUT/result.json`` by rank 0, and returned."""
        run, args, eval_loss = self.run, self.args, self.eval_loss
        ours, adamw = state_bytes(run.opt), adamw_state_bytes(run.config)
        result = dict(optimizer=args.optimizer, preset=args.preset, params=run.n_params,
                      steps=args.steps, eval_loss=eval_loss,
                      eval_perplexity=math.exp(eval_loss) if eval_loss is not None else None,
                      state_bytes=ours, adamw_state_bytes=adamw,
                      seconds=time.time() - self.t0, tokens=self.tokens_seen, curve=self.curve)
        self.say(f"\nfinal eval loss {eval_loss:.4f}, perplexity {result['eval_perplexity']:.2f} "
                 f"({args.preset}, {run.n_params / 1e6:.2f}M parameters, {args.steps} steps)")
        share = " on this rank (ZeRO shards it)" if run.engine is not None and run.world > 1 else ""
        self.say(f"optimizer state: {ours:,} bytes ({args.optimizer}){share}; torch AdamW would "
                 f"hold {adamw:,} bytes in one process ({ours / adamw:.0%})")
        if run.is_main:
            with open(os.path.join(args.output_dir, "result.json"), "w") as f:
                json.dump(result, f, indent=1)
        return result
