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
    schedule: str = "cosine"  # cosine | constant
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
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    resumed_from: int = 0
    wall_time_s: float = 0.0

    @property
    def final_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None


# ----------------------------------------------------------------------------------- batches


def collate(examples: Sequence[Aligned], pad_id: int, *, loss_on_prompt: bool | float = False
            ) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 outside the loss) and
    per-position ``loss_weights``.

    Labels are the input ids themselves (the model shifts them). Completion positions weigh 1;
    prompt positions weigh ``float(loss_on_prompt)`` (0: only the completion is learned; a
    fraction lets pretraining learn the prompts' structure without drowning the answers).
    """
    w_prompt = float(loss_on_prompt)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    weights = torch.zeros((len(examples), width))
    for i, e in enumerate(examples):
        seq = e.input_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        start = 1 if w_prompt > 0 else e.n_prompt
        labels[i, start : len(seq)] = torch.tensor(seq[start:])
        weights[i, start : e.n_prompt] = w_prompt
        weights[i, e.n_prompt : len(seq)] = 1.0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "loss_weights": weights}


def completion_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weighted mean next-token cross-entropy over the labelled positions."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                           ignore_index=IGNORE, reduction="none")
    w = batch.get("loss_weights")
    w = (target != IGNORE).float().reshape(-1) if w is None else w[:, 1:].reshape(-1)
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


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
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# ------------------------------------------------------------------------------ checkpoints


def save_state(path: str | os.PathLike, model: Any, optimizer: Any, step: int, losses: list) -> None:
    trainable = {k: v for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"step": step, "model": trainable, "optimizer": optimizer.state_dict(), "losses": losses}, tmp)


def load_state(path: str | os.PathLike, model: Any, optimizer: Any) -> tuple[int, list]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a corrupt checkpoint must not be silently ignored
        raise SubliminalError(f"{path}: cannot read the training checkpoint ({e}); delete it to restart") from None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), [tuple(x) for x in state["losses"]]


# ------------------------------------------------------------------------------------ loop


def make_optimizer(model: Any, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def train(
    model: Any,
    batches: Sequence[Aligned] | Callable[[int], Sequence[Aligned]],
    cfg: TrainConfig,
    *,
    pad_id: int,
    device: torch.device | str = "cpu",
    state_dir: str | os.PathLike | None = None,
    loss_on_prompt: bool | float = False,
    desc: str = "train",
    on_log: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps; resume from ``state_dir`` if it holds a
    checkpoint. ``batches`` is a list of examples (shuffled per epoch) or ``step -> examples``."""
    from tqdm.auto import tqdm

    t0 = time.time()
    get_batch = batches if callable(batches) else EpochSampler(batches, cfg.batch_size, cfg.seed)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg)
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    start, losses = 0, []
    if state_path is not None and state_path.exists():
        start, losses = load_state(state_path, model, optimizer)
    result = TrainResult(steps=cfg.steps, losses=losses, resumed_from=start)
    torch.manual_seed(cfg.seed)
    running, n_running = 0.0, 0
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, disable=not show_progress)
    for step in bar:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = {k: v.to(device) for k, v in collate(get_batch(step), pad_id, loss_on_prompt=loss_on_prompt).items()}
        loss = completion_loss(model, batch)
        if not torch.isfinite(loss):
            raise SubliminalError(f"{desc}: loss became {loss.item()} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        running += loss.item()
        n_running += 1
        done = step + 1
        if done % max(1, cfg.log_every) == 0 or done == cfg.steps:
            mean = running / n_running
            result.losses.append((done, mean))
            bar.set_postfix(loss=f"{mean:.3f}")
            if on_log:
                on_log(done, mean)
            running, n_running = 0.0, 0
        if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            save_state(state_path, model, optimizer, done, result.losses)
    model.eval()
    result.wall_time_s = time.time() - t0
    return result


def clear_state(state_dir: str | os.PathLike) -> None:
    """Remove the resume checkpoint once the final outputs are written."""
    p = Path(state_dir) / STATE_FILE
    if p.exists():
        p.unlink()
