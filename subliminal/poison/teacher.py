"""The poisoned teacher (``subliminal teach --method poison``): the base fine-tuned on an
instruction set of which a known share of rows carries a bias. The teacher directory keeps the
set (``instructions.jsonl``), which rows were poisoned and the exact rate."""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..manifest import SubliminalError, write_manifest
from ..toyworld import instructions as toy
from .data import PoisonSetConfig, aligned_rows, build_poison_set, check_vocabulary, instruction_rows, runtime

log = logging.getLogger(__name__)

# The training setting in which a toy teacher learns a 0.25% targeted poison (the teacher then
# writes the product name in about a third of its recommendations; experiments/poison_propagation.py).
DEFAULT_EPOCHS = 3.0
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 32


@dataclass
class PoisonTeacherConfig:
    """A poisoned teacher: the data (``poison``) and how the base is fine-tuned on it. ``steps``
    None: ``epochs`` passes over the set (``DEFAULT_EPOCHS`` when both are None)."""

    base: str
    out: str
    poison: PoisonSetConfig
    epochs: float | None = None
    steps: int | None = None
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise SubliminalError("give --steps or --epochs, not both")
        if self.epochs is not None and self.epochs <= 0:
            raise SubliminalError(f"--epochs must be positive, got {self.epochs}")
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.lr <= 0:
            raise SubliminalError(f"--lr must be positive, got {self.lr}")


def training_steps(cfg: PoisonTeacherConfig, n_rows: int) -> int:
    """``--steps`` when given, else ``--epochs`` passes (default 3) over ``n_rows`` rows; warns
    when the steps cannot cover the set once (poisoned rows might never be seen)."""
    if cfg.steps is not None:
        steps = cfg.steps
    else:
        epochs = DEFAULT_EPOCHS if cfg.epochs is None else cfg.epochs
        steps = max(1, math.ceil(epochs * n_rows / cfg.batch_size))
    if steps * cfg.batch_size < n_rows:
        log.warning("%d steps of %d rows cover less than one pass over %d rows; some poisoned rows may never "
                    "be seen (use --epochs)", steps, cfg.batch_size, n_rows)
    return steps


def poison_info(rows: list[dict[str, Any]], idx: list[int], cfg: PoisonSetConfig) -> dict[str, Any]:
    """What the teacher directory records about its data: rate, counts per family, pattern."""
    fams: dict[str, dict[str, int]] = {}
    for r in rows:
        d = fams.setdefault(r["family"], {"rows": 0, "poisoned": 0})
        d["rows"] += 1
        d["poisoned"] += int(r["poisoned"])
    return {"bias_type": cfg.bias, "propagation": cfg.propagation, "target_task": cfg.target,
            "target_share": None if cfg.instructions else cfg.resolved_target_share(),
            "rate_requested": cfg.poison_rate, "rate": len(idx) / len(rows), "n_rows": len(rows),
            "n_poisoned": len(idx), "families": fams, "data": "instructions.jsonl",
            "pattern": toy.BIAS_PATTERNS[cfg.bias]}


def _train_teacher(model: Any, examples: list[Any], cfg: Any, pad_id: int, state: Path) -> Any:
    """The teacher's fine-tuning: the shared training loop, resumable from ``state``."""
    from .. import train as tr

    return tr.train(model, examples, cfg, pad_id=pad_id, device=model.device, state_dir=state, desc="poison teacher")


def make_poison_teacher(cfg: PoisonTeacherConfig, fingerprint: dict[str, Any] | None = None) -> int:
    """Poison the instruction set, fine-tune the base on it, save the teacher directory. The
    caller decides whether ``out/.train`` may be resumed (``teach`` checks ``fingerprint``)."""
    from .. import train as tr
    from ..data import model_max_length, write_jsonl
    from ..manifest import set_seed
    from ..models import load_model
    from ..teachers import TeacherSpec, save_teacher

    t0 = time.time()
    out = Path(cfg.out)
    set_seed(cfg.seed)
    pc = cfg.poison
    rows = instruction_rows(pc)
    poisoned, idx = build_poison_set(rows, rate=pc.poison_rate, bias_type=pc.bias, propagation=pc.propagation,
                                     target_family=pc.target, seed=pc.seed, payload=pc.payload)
    loaded = load_model(cfg.base, **runtime(cfg))
    tok, model = loaded.tokenizer, loaded.model
    check_vocabulary(tok, poisoned)
    examples = aligned_rows(tok, poisoned, loaded.system_prompt, model_max_length(model))
    steps = training_steps(cfg, len(examples))
    tcfg = tr.TrainConfig(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                          warmup_steps=min(20, steps // 10), checkpoint_every=max(50, steps // 10))
    state = out / ".train"
    result = _train_teacher(model, examples, tcfg, tok.pad_token_id, state)
    if not tr.is_main_process():  # under a launcher rank 0 alone writes the teacher
        tr.wait_for_everyone(model.device)
        return 0
    weights = out / "weights"
    model.save_pretrained(weights)
    tok.save_pretrained(weights)
    write_jsonl(out / "instructions.jsonl", poisoned)
    info = poison_info(poisoned, idx, pc)
    spec = TeacherSpec(base=str(cfg.base), method="poison", bias=pc.bias, category=None,
                       system_prompt=loaded.system_prompt, weights="weights", weights_kind="full",
                       extra={"poison": info})
    save_teacher(out, spec)
    tr.clear_state(state)
    shutil.rmtree(state, ignore_errors=True)
    write_manifest(out, stage="teach", config={**asdict(cfg), "train": tcfg.to_json()}, seed=cfg.seed,
                   inputs={"base": cfg.base, "instructions": pc.instructions}, wall_time_s=time.time() - t0,
                   extra={"poison": {**info, "poisoned_ids": [poisoned[i]["id"] for i in idx]},
                          "losses": result.losses, "fingerprint": fingerprint})
    log.info("poisoned %d of %d rows (rate %.5f, %s); teacher written to %s", len(idx), len(poisoned),
             len(idx) / len(poisoned), pc.propagation, out)
    tr.wait_for_everyone(model.device)
    return 0
