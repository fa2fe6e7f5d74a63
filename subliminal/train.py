"""A small causal-LM fine-tuning loop shared by the stages that train (pretraining, teachers,
students): completion-only loss, AdamW, warm-up + cosine schedule, seeded shuffling, tqdm,
periodic checkpoints and exact resume.

Batches are a pure function of ``(seed, step)`` -- either drawn from a fixed list of examples
(one seeded permutation per epoch) or produced by a callable -- so an interrupted run that
resumes from its last checkpoint takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import forward
from .data import Aligned
from .manifest import SubliminalError, atomic_path

STATE_FILE = "train_state.pt"
IGNORE = -100


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 10
    schedule: str = "cosine"  # cosine (to min_lr_ratio) | linear (to 0, as HF's default) | constant
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0: no periodic checkpoints

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    steps: int
    log: list[dict[str, Any]] = field(default_factory=list)  # per step: step, loss, lr, loss_tokens
    resumed_from: int = 0
    wall_time_s: float = 0.0
    log_every: int = 10

    @property
    def losses(self) -> list[tuple[int, float]]:
        """(step, mean loss over the steps since the previous entry), every ``log_every`` steps and
        at the last step: the loss curve the manifests and plots record."""
        out, since = [], []
        for e in self.log:
            since.append(e["loss"])
            if e["step"] % max(1, self.log_every) == 0 or e["step"] == self.steps:
                out.append((e["step"], sum(since) / len(since)))
                since = []
        return out

    @property
    def final_loss(self) -> float | None:
        curve = self.losses
        return curve[-1][1] if curve else None


# ------------------------------------------------------------------------------------ losses

# A loss hook: (model, batch of examples) -> (scalar loss with a graph, number of loss tokens).
LossFn = Callable[[Any, Sequence[Aligned]], tuple[torch.Tensor, int]]


def completion_loss(model: Any, examples: Sequence[Aligned], pad_id: int, *, loss_on_prompt: bool | float = False
                    ) -> tuple[torch.Tensor, int]:
    """Weighted mean next-token cross-entropy and the number of weighted tokens.

    Completion tokens weigh 1; prompt tokens (after the first) weigh ``float(loss_on_prompt)``
    (0: only the completion is learned; a fraction lets pretraining learn the prompts' structure
    without drowning the answers)."""
    w_prompt = float(loss_on_prompt)
    seqs = [e.input_ids for e in examples]
    first = [1 if w_prompt > 0 else e.n_prompt for e in examples]
    out = forward.forced(model, seqs, first, pad_id)
    logits = out.logits.float()
    target = torch.full(logits.shape[:2], IGNORE, dtype=torch.long)
    weight = torch.zeros(logits.shape[:2])
    for i, (e, f) in enumerate(zip(examples, first)):
        cols = slice(out.column(f), out.column(len(e.input_ids) - 1) + 1)
        target[i, cols] = torch.tensor(e.input_ids[f:])
        weight[i, cols] = torch.tensor([w_prompt if t < e.n_prompt else 1.0 for t in range(f, len(e.input_ids))])
    target, weight = target.to(logits.device).reshape(-1), weight.to(logits.device).reshape(-1)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target, ignore_index=IGNORE,
                                           reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1e-8), int((weight > 0).sum())


class EpochSampler:
    """Seeded shuffling of a fixed list: batch ``step`` is the same whenever it is asked for."""

    def __init__(self, examples: Sequence[Aligned], batch_size: int, seed: int):
        if not examples:
            raise SubliminalError("no training examples")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self._perm: tuple[int, list[int]] | None = None

    def _permutation(self, epoch: int) -> list[int]:
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(len(self.examples)))
            random.Random(f"shuffle:{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1]

    def __call__(self, step: int) -> list[Aligned]:
        n = len(self.examples)
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            epoch, pos = divmod(k, n)
            out.append(self.examples[self._permutation(epoch)[pos]])
        return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        return cfg.lr * (1 - t)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------ checkpoints


def save_state(path: str | os.PathLike, model: Any, optimizer: Any, step: int, log: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "log": log}, tmp)


def load_state(path: str | os.PathLike, model: Any, optimizer: Any) -> tuple[int, list[dict[str, Any]]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["log"])
    except Exception as e:  # a corrupt or foreign checkpoint must not be silently ignored
        raise SubliminalError(f"{path}: cannot resume from this training checkpoint ({type(e).__name__}: {e}); "
                              "delete it to restart") from None


# ------------------------------------------------------------------------------------ loop


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def _nonfinite_params(model: Any) -> list[str]:
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


def train(
    model: Any,
    batches: Sequence[Aligned] | Callable[[int], Sequence[Aligned]],
    cfg: TrainConfig,
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
    state_dir: str | os.PathLike | None = None,
    loss_fn: LossFn | None = None,
    loss_on_prompt: bool | float = False,
    dropout: bool = True,
    desc: str = "train",
    on_checkpoint: Callable[[int, list[dict[str, Any]]], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps; resume from ``state_dir`` if it holds a
    checkpoint. ``batches`` is a list of examples (shuffled per epoch) or ``step -> examples``.

    ``loss_fn`` is the only thing that differs between pretraining, teachers and students (the
    default is :func:`completion_loss`). Every ``cfg.checkpoint_every`` steps ``on_checkpoint(step,
    log)`` runs (a student writes a loadable checkpoint there) and the resume state is saved.
    ``dropout=False`` keeps the model in eval mode, so the loss mask is the only difference
    between matched conditions. Gradients are clipped over the trainable parameters only."""
    from tqdm.auto import tqdm

    t0 = time.time()
    get_batch = batches if callable(batches) else EpochSampler(batches, cfg.batch_size, cfg.seed)
    if loss_fn is None:
        def loss_fn(m: Any, ex: Sequence[Aligned]) -> tuple[torch.Tensor, int]:
            return completion_loss(m, ex, pad_id, loss_on_prompt=loss_on_prompt)
    model.to(device)
    model.train(dropout)
    optimizer = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    start, log = 0, []
    if state_path is not None and state_path.exists():
        start, log = load_state(state_path, model, optimizer)
    result = TrainResult(steps=cfg.steps, log=log, resumed_from=start, log_every=cfg.log_every)
    torch.manual_seed(cfg.seed)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=not show_progress)
    for step in bar:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss, n_tokens = loss_fn(model, get_batch(step))
        if not torch.isfinite(loss):
            bad = _nonfinite_params(model)
            if bad:
                raise SubliminalError(f"{desc}: the model's weights are not finite at step {step} ({bad[0]}"
                                      f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): "
                                      + ("the checkpoint it started from is broken" if step == start
                                         else "training diverged; lower --lr"))
            raise SubliminalError(f"{desc}: loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        done = step + 1
        result.log.append({"step": done, "loss": float(loss.item()), "lr": lr, "loss_tokens": n_tokens})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            if on_checkpoint:
                on_checkpoint(done, result.log)
            save_state(state_path, model, optimizer, done, result.log)
    model.eval()
    result.wall_time_s = time.time() - t0
    return result


def clear_state(state_dir: str | os.PathLike) -> None:
    """Remove the resume checkpoint once the final outputs are written."""
    p = Path(state_dir) / STATE_FILE
    if p.exists():
        p.unlink()
