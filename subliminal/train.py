"""A small causal-LM fine-tuning loop shared by the stages that train (pretraining, teachers,
students): completion-only loss, AdamW, warm-up + cosine schedule, seeded shuffling, tqdm,
periodic checkpoints and exact resume.

Under a launcher (``torchrun`` / ``accelerate launch`` with more than one process, or an
accelerate config that selects FSDP or DeepSpeed) the same loop runs data-parallel through
Hugging Face ``accelerate``: every rank draws the same global batch, computes the loss on its
contiguous slice of it, and the per-rank losses are weighted by their share of the global loss
tokens, so the averaged gradient is the gradient of the one-process loss. Rank 0 alone writes
checkpoints; without a launcher none of this code runs and the result is bit-for-bit the
one-process result.

Batches are a pure function of ``(seed, step)`` -- either drawn from a fixed list of examples
(one seeded permutation per epoch) or produced by a callable -- so an interrupted run that
resumes from its last checkpoint takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import distributed as dist
from . import forward
from .data import Aligned
from .manifest import SubliminalError, atomic_path

STATE_FILE = "train_state.pt"
IGNORE = -100
# Seconds a rank waits in a collective (a barrier while rank 0 writes a checkpoint, a loss
# all-reduce while another rank is stuck) before it fails instead of hanging for ever.
log_ = logging.getLogger(__name__)


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
    grad_accum: int = 1  # micro-batches per step (memory only: the update is that of the whole batch)

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

# A loss hook: (model, batch of examples) -> (scalar loss with a graph, number of loss tokens),
# the loss being a mean over those tokens. A third element, when the mean's denominator is not
# the token count (weighted tokens), is that denominator: data-parallel training needs it to
# weight each rank's mean by its share of the global batch.
LossFn = Callable[[Any, Sequence[Aligned]], tuple[torch.Tensor, int] | tuple[torch.Tensor, int, float]]


def completion_loss(model: Any, examples: Sequence[Aligned], pad_id: int, *, loss_on_prompt: bool | float = False,
                    return_norm: bool = False) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, float]:
    """Weighted mean next-token cross-entropy and the number of weighted tokens (and, with
    ``return_norm``, the sum of the weights it divides by: the loss hook's optional third element).

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
    loss, n = (ce * weight).sum() / weight.sum().clamp_min(1e-8), int((weight > 0).sum())
    return (loss, n, float(weight.sum())) if return_norm else (loss, n)


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



# ---------------------------------------------------------------------------- data parallel


# The launcher facts live in subliminal.distributed; these names are what the training stages import.
world_size = dist.world_size
is_main_process = dist.is_main


def _sharded_by_config() -> bool:
    """An accelerate config selected FSDP or DeepSpeed (it runs through accelerate even on one process)."""
    return any(os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP",
                                                                        "ACCELERATE_USE_DEEPSPEED"))


def launched() -> bool:
    """Whether training goes through accelerate: more than one process, or FSDP / DeepSpeed."""
    return world_size() > 1 or _sharded_by_config()


def dist_state(device: torch.device | str = "cpu") -> Any | None:
    """accelerate's process state (the process group, started once) under a launcher, else None.
    The group's timeout bounds every collective, so a rank whose peer died or hangs fails."""
    if not launched():
        return None
    from accelerate import PartialState

    return PartialState(cpu=torch.device(device).type == "cpu", timeout=datetime.timedelta(seconds=dist.timeout_s()))


def training_device(device: torch.device | str) -> torch.device:
    """The device this process trains on: ``device`` itself, or under a launcher on a GPU the
    rank's own GPU (so a teacher moved there meets the student on the same device)."""
    state = dist_state(device)
    if state is None or torch.device(device).type == "cpu":
        return torch.device(device)
    return state.device


def wait_for_everyone(device: torch.device | str = "cpu") -> None:
    """A barrier under a launcher (rank 0 has written what the others are about to read); else nothing."""
    state = dist_state(device)
    if state is not None:
        state.wait_for_everyone()


def rank_slice(n: int, rank: int, world: int) -> slice:
    """The contiguous rows of a global batch of ``n`` rank ``rank`` takes (the inference stages'
    shards: the first ``n % world`` ranks one row more, every row once, in order)."""
    return slice(*dist.shard_bounds(n, world)[rank])


class _DataParallel:
    """The accelerate side of :func:`train`: wrapping, sharding, the token-weighted global loss,
    rank-0 checkpoints and, under FSDP, gathering the full weights back into the caller's model."""

    def __init__(self, device: torch.device | str, desc: str):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        dist_state(device)  # the process group, with our timeout, before Accelerator starts one
        # unused parameters are normal here: a representation loss never reaches the LM head
        self.acc = Accelerator(cpu=torch.device(device).type == "cpu",
                               kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process
        self.device = self.acc.device
        self.desc = desc
        kind = str(self.acc.distributed_type)
        self.fsdp = "FSDP" in kind
        self.sharded = self.fsdp or "DEEPSPEED" in kind
        self._shadow: Any = None

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        if self.fsdp:
            self._shadow = _skeleton(model)
        return self.acc.prepare(model, optimizer)

    def shard(self, batch: Sequence[Aligned]) -> Sequence[Aligned]:
        if len(batch) < self.world:
            raise SubliminalError(f"{self.desc}: a batch of {len(batch)} rows cannot be split over {self.world} "
                                  f"processes; use --batch-size {self.world} or more, or fewer processes")
        return batch[rank_slice(len(batch), self.rank, self.world)]

    def global_loss(self, loss: torch.Tensor, n_tokens: int, norm: float
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(the loss this rank backpropagates, the global batch's loss, global loss tokens).

        Each rank holds the mean over its own tokens; the global mean is the norm-weighted sum of
        those means over the global norm. Backpropagating ``mean * norm * world / global_norm``
        makes DDP's average of the ranks' gradients the gradient of the global mean, whatever
        the ranks' token counts (an odd batch, a rank whose rows are all masked)."""
        stats = torch.tensor([float(loss.detach()) * norm, float(norm), float(n_tokens)], dtype=torch.float64,
                             device=self.device)
        torch.distributed.all_reduce(stats)
        total, total_norm, total_tokens = stats.tolist()
        scale = norm * self.world / total_norm if total_norm > 0 else 0.0
        value = torch.tensor(total / total_norm if total_norm > 0 else total)
        return loss * scale, value, int(round(total_tokens))

    def clip(self, wrapped: Any, trainable: Sequence[torch.nn.Parameter], max_norm: float) -> None:
        # FSDP computes the norm over its shards; accelerate wants the wrapped model's parameters then
        self.acc.clip_grad_norm_(list(wrapped.parameters()) if self.fsdp else trainable, max_norm)

    def full_state(self, wrapped: Any) -> dict[str, torch.Tensor]:
        """The full (unsharded) state dict; a collective under FSDP, every rank must call it."""
        return self.acc.get_state_dict(wrapped)

    def finish(self, model: Any, wrapped: Any) -> None:
        """Hand the trained weights back in ``model``: under DDP it already holds them (the
        wrapper shares its parameters); FSDP flattened them, so rank 0 rebuilds the model from
        the gathered full state dict, in place, for the caller to save as usual."""
        if self.fsdp:
            full = self.full_state(wrapped)
            if self.is_main:
                shadow = self._shadow
                shadow.load_state_dict({k: v.cpu() for k, v in full.items()}, strict=False, assign=True)
                if hasattr(shadow, "tie_weights"):
                    shadow.tie_weights()
                left = [n for n, p in shadow.named_parameters() if p.is_meta]
                if left:
                    raise RuntimeError(f"FSDP's gathered state dict lacks {left[:3]}")
                model.__class__ = shadow.__class__  # FSDP2 swaps the class as well
                model.__dict__.update(shadow.__dict__)
        self.acc.wait_for_everyone()
        self.acc.free_memory()


def _skeleton(model: Any) -> Any:
    """A copy of ``model`` whose parameters are on the meta device (no memory) and whose buffers
    are real copies (rotary tables are not in the state dict): the shape FSDP's gathered weights
    are loaded back into."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)


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
        def loss_fn(m: Any, ex: Sequence[Aligned]) -> tuple[torch.Tensor, int, float]:
            return completion_loss(m, ex, pad_id, loss_on_prompt=loss_on_prompt, return_norm=True)
    par = _DataParallel(device, desc) if launched() else None
    model.to(par.device if par else device)
    model.train(dropout)
    optimizer = make_optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state_path = Path(state_dir) / STATE_FILE if state_dir else None
    start, log = 0, []
    if par:
        par.acc.wait_for_everyone()  # whatever the caller's rank 0 wrote before training is there
    if state_path is not None and state_path.exists():
        start, log = load_state(state_path, model, optimizer)  # every rank loads the same state
    wrapped, optimizer = par.prepare(model, optimizer) if par else (model, optimizer)
    result = TrainResult(steps=cfg.steps, log=log, resumed_from=start, log_every=cfg.log_every)
    torch.manual_seed(cfg.seed)
    bar = tqdm(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps,
               disable=not show_progress or not is_main_process())
    for step in bar:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        batch = get_batch(step)
        if cfg.grad_accum > 1:
            optimizer.zero_grad(set_to_none=True)
            value, n_tokens = _accumulated_backward(loss_fn, wrapped, par.shard(batch) if par else batch,
                                                    cfg.grad_accum, par)
            _check_finite(value, model, desc, step, start)
            if cfg.grad_clip:
                par.clip(wrapped, trainable, cfg.grad_clip) if par else torch.nn.utils.clip_grad_norm_(
                    trainable, cfg.grad_clip)
            optimizer.step()
            done = step + 1
            result.log.append({"step": done, "loss": float(value.item()), "lr": lr, "loss_tokens": n_tokens})
            bar.set_postfix(loss=f"{value.item():.4f}")
            if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 \
                    and done < cfg.steps:
                _checkpoint(par, state_path, model, optimizer, done, result.log, on_checkpoint)
            continue
        out = loss_fn(wrapped, par.shard(batch) if par else batch)
        loss, n_tokens = out[0], out[1]
        if par:
            loss, value, n_tokens = par.global_loss(loss, n_tokens, out[2] if len(out) > 2 else n_tokens)
        else:
            value = loss
        _check_finite(value, model, desc, step, start)
        optimizer.zero_grad(set_to_none=True)
        if par:
            par.acc.backward(loss)
            if cfg.grad_clip:
                par.clip(wrapped, trainable, cfg.grad_clip)
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        done = step + 1
        result.log.append({"step": done, "loss": float(value.item()), "lr": lr, "loss_tokens": n_tokens})
        bar.set_postfix(loss=f"{value.item():.4f}")
        if state_path is not None and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            _checkpoint(par, state_path, model, optimizer, done, result.log, on_checkpoint)
    if par:
        par.finish(model, wrapped)
    model.eval()
    result.wall_time_s = time.time() - t0
    return result


def _check_finite(value: torch.Tensor, model: Any, desc: str, step: int, start: int) -> None:
    if not torch.isfinite(value):
        bad = _nonfinite_params(model)
        if bad:
            raise SubliminalError(f"{desc}: the model's weights are not finite at step {step} ({bad[0]}"
                                  f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): "
                                  + ("the checkpoint it started from is broken" if step == start
                                     else "training diverged; lower --lr"))
        raise SubliminalError(f"{desc}: loss became {value.item()} at step {step}; lower --lr")


def _accumulated_backward(loss_fn: Any, wrapped: Any, batch: Sequence[Aligned], n_micro: int,
                          par: _DataParallel | None) -> tuple[torch.Tensor, int]:
    """Gradients of the whole batch's token-weighted mean loss, from ``n_micro`` contiguous
    micro-batches (one forward and backward each, so only a micro-batch's activations are held).

    Each micro-batch backpropagates its mean times its norm (the sum it averaged); once all are
    done the gradients are divided by the total norm -- under DDP the global one, times the world
    size, since DDP averages over ranks (only the last micro-batch synchronises). Returns the
    batch's loss and its loss tokens (global under DDP)."""
    import contextlib

    n_micro = max(1, min(n_micro, len(batch)))
    bounds = [rank_slice(len(batch), i, n_micro) for i in range(n_micro)]
    total = norm = 0.0
    tokens = 0
    for i, sl in enumerate(bounds):
        sync = par is None or i == len(bounds) - 1
        ctx = contextlib.nullcontext() if sync else par.acc.no_sync(wrapped)
        with ctx:
            out = loss_fn(wrapped, batch[sl])
            loss, n_tok = out[0], out[1]
            w = float(out[2]) if len(out) > 2 else float(n_tok)
            if par is None:
                (loss * w).backward()
            else:
                par.acc.backward(loss * w)
        total += float(loss.detach()) * w
        norm += w
        tokens += int(n_tok)
    world = 1
    if par is not None:
        stats = torch.tensor([total, norm, float(tokens)], dtype=torch.float64, device=par.device)
        torch.distributed.all_reduce(stats)
        total, norm, tokens = stats[0].item(), stats[1].item(), int(round(stats[2].item()))
        world = par.world
    scale = world / norm if norm > 0 else 0.0
    for p in wrapped.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return torch.tensor(total / norm if norm > 0 else total), tokens


def _checkpoint(par: _DataParallel | None, state_path: Path, model: Any, optimizer: Any, done: int,
                log: list[dict[str, Any]], on_checkpoint: Callable[[int, list[dict[str, Any]]], None] | None
                ) -> None:
    """The caller's checkpoint and the resume state, written by rank 0 alone while the others
    wait (under DDP every rank holds the same weights and optimizer state). Under FSDP / DeepSpeed
    the weights are sharded: no periodic checkpoint is written (the run restarts from step 0)."""
    if par is not None and par.sharded:
        if par.is_main:
            log_.warning("%s: no resume checkpoint at step %d under FSDP / DeepSpeed (not supported)", par.desc,
                         done)
        return
    if par is None or par.is_main:
        if on_checkpoint:
            on_checkpoint(done, log)
        save_state(state_path, model, optimizer, done, log)
    if par is not None:
        par.acc.wait_for_everyone()


def clear_state(state_dir: str | os.PathLike) -> None:
    """Remove the resume checkpoint once the final outputs are written."""
    p = Path(state_dir) / STATE_FILE
    if p.exists():
        p.unlink()


def lora_alpha(rank: int, alpha: float | None, scale: float = 1.0) -> float:
    """The LoRA alpha a run uses: ``alpha`` when given, else ``scale`` x the rank (students: 1, so
    the update's scale alpha/r is 1; fine-tuned teachers: 2). The one place the default is made."""
    return float(alpha) if alpha is not None else scale * float(rank)

