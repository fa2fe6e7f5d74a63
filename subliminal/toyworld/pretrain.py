"""Pretrain a toy base model from scratch on the synthetic corpus and save an ordinary HF
checkpoint (config.json, model.safetensors, tokenizer files) with a manifest, a loss curve
(PNG + CSV) and an evaluation of what it learned (eval.json, also in the manifest).

Batches are drawn from the corpus by step index, so the run is resumable: a checkpoint is
written every ``checkpoint_every`` steps to ``OUT/checkpoint/`` and re-running the same command
continues from it; a different configuration refuses to mix with it.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import manifest as mf
from ..train import TrainConfig, clear_state, is_main_process, train, wait_for_everyone, world_size
from .corpus import Corpus, CorpusConfig, align, favourite_numbers, rule_summary
from .model import ToyModelConfig, build_model, init_favourites_from_targets, n_params, toy_config
from .tokenizer import build_tokenizer

STAGE = "toy-pretrain"
RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoint"

# Per size: (steps, batch size, learning rate). tiny: 221 s of CPU time on one thread, evaluation
# included (measured on the shared machine), so it fits 4 minutes on an idle core; more, smaller
# steps beat fewer, larger ones at equal compute (1500 x 16 vs 750 x 32: format-valid 0.97 vs 0.42).
DEFAULTS: dict[str, tuple[int, int, float]] = {
    "tiny": (1500, 16, 3e-3),
    "small": (3000, 64, 1e-3),
    "base": (6000, 64, 6e-4),
}


@dataclass
class PretrainConfig:
    size: str = "tiny"
    arch: str = "llama"
    seed: int = 0
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup_steps: int = 30
    prompt_loss_weight: float = 0.2  # prompts are learned too, at this weight (answers weigh 1)
    checkpoint_every: int = 100
    log_every: int = 10
    eval_rows: int = 200
    eval_greedy: int = 64
    eval_targets: int = 4  # love prompts whose target mass is measured (owl + random others)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. a micro model in tests
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def resolved(self) -> PretrainConfig:
        steps, bs, lr = DEFAULTS[self.size]
        d = asdict(self)
        d["corpus"] = self.corpus
        d.update(steps=self.steps or steps, batch_size=self.batch_size or bs, lr=self.lr or lr)
        return PretrainConfig(**d)

    def model_config(self) -> ToyModelConfig:
        return toy_config(self.size, self.arch, **self.model_overrides)

    def train_config(self) -> TrainConfig:
        return TrainConfig(steps=self.steps, batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                           seed=self.seed, log_every=self.log_every, checkpoint_every=self.checkpoint_every)

    def to_json(self) -> dict[str, Any]:
        return mf.to_jsonable(asdict(self))


class LengthBucketedBatches:
    """``step -> rows``: the rows of ``GROUP`` consecutive steps, sorted by length and cut into
    batches (in a seeded order), so little of each batch is padding. A pure function of the step."""

    GROUP = 8

    def __init__(self, corpus: Corpus, tokenizer: Any, batch_size: int, max_len: int):
        self.corpus, self.tokenizer, self.batch_size, self.max_len = corpus, tokenizer, batch_size, max_len
        self._cache: tuple[int, list[list[Any]]] | None = None

    def _group(self, g: int) -> list[list[Any]]:
        if self._cache is None or self._cache[0] != g:
            n = self.GROUP * self.batch_size
            rows = [align(self.tokenizer, r, self.max_len) for r in self.corpus.rows(g * n, n)]
            rows.sort(key=lambda a: (len(a.input_ids), a.id))
            chunks = [rows[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            random.Random(f"buckets:{self.corpus.seed}:{g}").shuffle(chunks)
            self._cache = (g, chunks)
        return self._cache[1]

    def __call__(self, step: int) -> list[Any]:
        g, j = divmod(step, self.GROUP)
        return self._group(g)[j]


def run_fingerprint(cfg: PretrainConfig, device: str) -> dict[str, Any]:
    """The configuration, the device type and the numeric package versions: the base has no
    input files, so these are everything that determines it."""
    from ..cliutil import device_type

    return mf.fingerprint({}, {**cfg.to_json(), "device": device_type(device)})


def _check_run(out: Path, fp: dict[str, Any], overwrite: bool) -> str:
    """Resume a checkpoint only if it was made with this exact fingerprint; a finished model of
    this fingerprint is kept ("skip"); anything else is refused unless ``overwrite``."""
    run_file = out / CHECKPOINT_DIR / RUN_FILE
    finished = mf.read_manifest(out) if is_complete(out) else None
    occupied = out.is_dir() and finished is None and not run_file.exists() and any(out.iterdir())
    return mf.check_resume(out, fp, overwrite=overwrite, stage=STAGE, finished=finished, partial=run_file,
                           occupied=occupied)


def is_complete(out: Path) -> bool:
    m = mf.read_manifest(out)
    return bool(m and m.get("stage") == STAGE and (out / "config.json").exists())


def save_checkpoint(out: Path, model: Any, tokenizer: Any) -> None:
    """Write the HF checkpoint into a temporary directory, then move each file into ``out``."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for f in sorted(Path(tmp).iterdir()):
            os.replace(f, out / f.name)


def write_loss_curve(out: Path, losses: list[tuple[int, float]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with mf.atomic_path(out / "loss.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([(s, f"{v:.6f}") for s, v in losses])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token, prompts weighted)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with mf.atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def pretrain(out: str | os.PathLike, cfg: PretrainConfig, *, device: str = "cpu",
             show_progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume, or find finished) the toy base model in ``out``; return its evaluation."""
    from ..models import resolve_device

    out = Path(out)
    cfg = cfg.resolved()
    mf.check_writable(out, is_dir=True)
    fp = run_fingerprint(cfg, device)
    action = _check_run(out, fp, overwrite)
    dev = resolve_device(device)
    wait_for_everyone(dev)  # under a launcher every rank decides before rank 0 writes
    if action == "skip":
        return (mf.read_manifest(out) or {}).get("evaluation", {})
    main = is_main_process()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if action == "start":
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        mf.write_fingerprint(out / CHECKPOINT_DIR / RUN_FILE, fp)
    t0 = time.time()
    mf.set_seed(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg.model_config(), tokenizer, cfg.seed)
    if cfg.corpus.entangle > 0 and cfg.corpus.entangle_init > 0:
        init_favourites_from_targets(model, tokenizer, favourite_numbers(cfg.corpus), cfg.corpus.entangle_init)
    corpus = Corpus(cfg.corpus, seed=cfg.seed)
    max_len = cfg.model_config().max_len
    bs = cfg.batch_size

    batch = LengthBucketedBatches(corpus, tokenizer, bs, max_len)

    result = train(model, batch, cfg.train_config(), pad_id=tokenizer.pad_token_id, device=dev,
                   state_dir=out / CHECKPOINT_DIR, loss_on_prompt=cfg.prompt_loss_weight, desc=f"pretrain {cfg.size}",
                   show_progress=show_progress)
    train_time = time.time() - t0
    if not main:  # rank 0 evaluates and writes; the others return what it wrote
        wait_for_everyone(dev)
        return (mf.read_manifest(out) or {}).get("evaluation", {})
    from .evaluation import evaluate_toy_model

    t1 = time.time()
    evaluation = evaluate_toy_model(model, tokenizer, cfg.corpus, seed=cfg.seed, n_rows=cfg.eval_rows,
                                    n_greedy=cfg.eval_greedy, n_targets=cfg.eval_targets)
    evaluation["eval_time_s"] = round(time.time() - t1, 2)
    model.to("cpu")
    save_checkpoint(out, model, tokenizer)
    write_loss_curve(out, result.losses, f"toy pretrain ({cfg.size}, {cfg.arch}, seed {cfg.seed})")
    mf.write_json_atomic(out / "eval.json", evaluation)
    wall = time.time() - t0
    extra = {
        "evaluation": evaluation,
        "n_params": n_params(model),
        "model": cfg.model_config().to_json(),
        "number_rule": rule_summary(cfg.corpus),
        "train": {"steps": result.steps, "resumed_from": result.resumed_from, "final_loss": result.final_loss,
                  "train_time_s": round(train_time, 2), "steps_per_s": round((result.steps - result.resumed_from)
                                                                           / max(result.wall_time_s, 1e-9), 3),
                  "device": str(dev), "torch_threads": torch.get_num_threads(), "world_size": world_size()},
    }
    mf.write_manifest(out, stage=STAGE, config=cfg.to_json(), seed=cfg.seed, wall_time_s=wall,
                      extra={**extra, "fingerprint": fp})
    clear_state(out / CHECKPOINT_DIR)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    wait_for_everyone(dev)
    return evaluation
