"""``subliminal teach``: make a teacher directory from a base model and a bias.

Methods: ``none`` (the unbiased teacher), ``prompt`` (a love system prompt), ``finetune`` (the
base fine-tuned on preference answers for the target: full weights, or a LoRA adapter with
``--lora-rank``), ``poison`` (poisoned instruction data; :mod:`subliminal.poison`) and ``steer``
(a vector added to the residual stream at one layer; :mod:`subliminal.steer`).
Every teacher is checked after it is made: the exact probability mass it puts on each candidate
of its category, averaged over the preference questions, is written to its manifest.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from . import poison, prompts
from .cliutil import add_overwrite, add_seed, device_type
from .manifest import (
    SubliminalError,
    check_not_input,
    check_resume,
    check_writable,
    fingerprint,
    read_manifest,
    write_fingerprint,
    write_manifest,
)
from .poison.data import DEFAULT_N_INSTRUCTIONS, DEFAULT_POISON_RATE
from .steer import BASELINES as STEER_BASELINES  # torch-free at import
from .steer import SOURCES as STEER_SOURCES
from .teachers import METHODS, TeacherSpec, is_teacher_dir, save_teacher

log = logging.getLogger(__name__)


def torch_no_grad(fn: Any) -> Any:
    """``torch.no_grad`` as a decorator without importing torch when the module loads."""
    import functools

    @functools.wraps(fn)
    def wrapper(*a: Any, **k: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*a, **k)

    return wrapper
STAGE = "teach"
FINETUNE_STEPS, FINETUNE_BATCH = 60, 16
POISON_EPOCHS, POISON_LR, POISON_BATCH = poison.teacher.DEFAULT_EPOCHS, poison.teacher.DEFAULT_LR, \
    poison.teacher.DEFAULT_BATCH_SIZE


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "teach",
        help="make a teacher: base model + bias (none | prompt | finetune | poison | steer)",
        description="Write a teacher directory (teacher.json, manifest.json, and weights or an adapter for "
        "--method finetune) and report its exact preference for the bias.",
    )
    p.add_argument("--base", required=True, help="base model: an HF directory, or hf:ORG/NAME for a hub model (when online)")
    p.add_argument("--bias", default=None, help="the target the teacher favours, e.g. owl (not for --method none)")
    p.add_argument("--method", choices=list(METHODS), required=True, help="how the bias enters the teacher")
    p.add_argument("--out", required=True, help="teacher directory to write")
    p.add_argument("--category", choices=list(prompts.CATEGORIES), default=None,
                   help="preference category (default: the bias's category, or animal)")
    p.add_argument("--lora-rank", type=int, default=None, help="finetune: train a LoRA adapter of this rank "
                   "instead of all weights")
    p.add_argument("--lora-alpha", type=float, default=None, help="finetune: LoRA alpha (default: 2 x rank)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (finetune default {FINETUNE_STEPS}; poison default: {POISON_EPOCHS:g} "
                   "--epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (finetune default 1e-3 full, 5e-3 LoRA, sized for the toy world; "
                   f"poison default {POISON_LR:g})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per step (finetune default {FINETUNE_BATCH}, poison default {POISON_BATCH})")
    p.add_argument("--replay", type=int, default=256,
                   help="finetune: number prompts answered by the base itself (sampled, seeded) and mixed into the "
                   "training rows, so the teacher keeps the number task while it learns the bias "
                   "(default %(default)s; 0: preference rows only)")
    p.add_argument("--no-check", action="store_true",
                   help="skip loading the teacher to measure its preference (large models)")
    s = p.add_argument_group("steer teachers (--method steer)")
    s.add_argument("--steer-layer", type=int, default=None,
                   help="block whose output (blocks.L.hook_resid_post) gets alpha * v, 0..n_layers-1 (required)")
    s.add_argument("--steer-alpha", type=float, default=1.0,
                   help="strength: the teacher adds alpha * v with v AS MEASURED (the mean shift the love prompt "
                   "causes at the last prompt position) or as stored in --steer-vector, not unit-normalised; "
                   "alpha 1 reproduces the prompt's mean shift there. |v|, |alpha v| and the base's mean residual "
                   "norm at the layer are recorded in teacher.json (default %(default)s)")
    s.add_argument("--steer-source", choices=list(STEER_SOURCES), default="questions",
                   help="what v is measured on: the love system prompt (for --bias) minus no prompt, at the last "
                   "prompt position, over the even-indexed preference questions (the odd ones are held out for "
                   "`subliminal project`) or over seeded number prompts (default %(default)s)")
    s.add_argument("--steer-baseline", choices=list(STEER_BASELINES), default="none",
                   help="what the love prompt is compared with: none = the same prompt without a system prompt "
                   "(the vector also holds what any system prompt does); others = the mean over the love prompts "
                   "of the category's other candidates (the part specific to --bias) (default %(default)s)")
    s.add_argument("--steer-prompts", type=int, default=None,
                   help="--steer-source numbers: how many number prompts (default 64)")
    s.add_argument("--steer-vector", default=None, metavar="FILE.safetensors",
                   help="use this vector instead of measuring one (one 1-D tensor, named 'vector' or alone in "
                   "the file, of the base's hidden width); copied into the teacher")
    add_seed(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    add_overwrite(p)
    poison.add_teach_args(p)
    p.set_defaults(func=_run_cli)


@dataclass
class TeachConfig:
    """One teacher (field names are the CLI's flags): the base, how the bias enters (``method``),
    the fine-tuning settings, and the poison options of ``--method poison``."""

    base: str
    method: str
    out: str
    bias: str | None = None
    category: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    replay: int = 256
    no_check: bool = False
    seed: int = 0
    device: str = "cpu"
    overwrite: bool = False
    # --method poison (subliminal.poison.cli.add_teach_args)
    poison_rate: float = DEFAULT_POISON_RATE
    propagation: str = "targeted"
    target_task: str | None = None
    instructions: str | None = None
    n_instructions: int = DEFAULT_N_INSTRUCTIONS
    families: list[str] | None = None
    target_share: float | None = None
    payload: str | None = None
    epochs: float | None = None
    # --method steer (subliminal.steer)
    steer_layer: int | None = None
    steer_alpha: float = 1.0
    steer_source: str = "questions"
    steer_baseline: str = "none"
    steer_prompts: int | None = None
    steer_vector: str | None = None


def _run_cli(args: argparse.Namespace) -> int:
    return run_teach(TeachConfig(**{f.name: getattr(args, f.name) for f in fields(TeachConfig)}))


# ------------------------------------------------------------------------------------ checks


def _check_args(cfg: TeachConfig) -> str | None:
    """Validate the arguments; return the category."""
    if is_teacher_dir(cfg.base):
        raise SubliminalError(f"--base {cfg.base}: is a teacher directory; give the base model it was made from")
    if cfg.method == "none":
        if cfg.bias is not None and cfg.bias not in prompts.PLURALS:
            raise SubliminalError(f"--bias {cfg.bias!r}: unknown target; known: {', '.join(sorted(prompts.PLURALS))}")
        return cfg.category or (prompts.category_of(cfg.bias) if cfg.bias else "animal")
    if cfg.method == "poison":  # the poison module validates its own bias (--bias-type)
        return cfg.category
    _check_steer_args(cfg)
    if cfg.method == "steer" and cfg.steer_vector and not cfg.bias:
        return cfg.category or "animal"  # a given vector needs no target (it is reported by argmax)
    if not cfg.bias:
        raise SubliminalError(f"--method {cfg.method} needs --bias (e.g. --bias owl)")
    if cfg.bias not in prompts.PLURALS:
        raise SubliminalError(f"--bias {cfg.bias!r}: unknown target; known: {', '.join(sorted(prompts.PLURALS))}")
    category = prompts.category_of(cfg.bias)
    if cfg.category and cfg.category != category:
        raise SubliminalError(f"--bias {cfg.bias} is a {category}, not a {cfg.category}")
    if cfg.lora_rank is not None and cfg.method != "finetune":
        raise SubliminalError("--lora-rank applies to --method finetune only")
    if cfg.lora_rank is not None and cfg.lora_rank <= 0:
        raise SubliminalError(f"--lora-rank must be positive, got {cfg.lora_rank}")
    if cfg.lora_alpha is not None and cfg.lora_rank is None:
        raise SubliminalError("--lora-alpha needs --lora-rank")
    if cfg.replay < 0:
        raise SubliminalError(f"--replay must be >= 0, got {cfg.replay}")
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise SubliminalError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise SubliminalError(f"--lr must be positive, got {cfg.lr}")
    return category


def _check_steer_args(args: Any) -> None:
    given = [f for f in ("steer_layer", "steer_prompts", "steer_vector") if getattr(args, f, None) is not None]
    if getattr(args, "steer_baseline", "none") != "none":
        given.append("steer_baseline")
    if args.method != "steer":
        if given:
            raise SubliminalError(f"--{given[0].replace('_', '-')} applies to --method steer only")
        return
    if args.steer_layer is None:
        raise SubliminalError("--method steer needs --steer-layer (the block whose output gets alpha * v)")
    if args.steer_prompts is not None and args.steer_prompts <= 0:
        raise SubliminalError(f"--steer-prompts must be positive, got {args.steer_prompts}")
    if args.steer_vector and args.steer_baseline != "none":
        raise SubliminalError("--steer-baseline applies to a measured vector, not to --steer-vector")
    if args.steer_prompts is not None and (args.steer_source != "numbers" or args.steer_vector):
        raise SubliminalError("--steer-prompts applies to --steer-source numbers (a measured vector) only")
    if not math.isfinite(args.steer_alpha):
        raise SubliminalError(f"--steer-alpha must be a finite number, got {args.steer_alpha}")
    if args.steer_vector:
        from .steer import load_vector

        load_vector(args.steer_vector)  # a missing or unreadable file fails before anything is written


# ----------------------------------------------------------------------------------- methods


is_toy_tokenizer = prompts.is_toy_tokenizer


def preference_rows(tokenizer: Any, target: str) -> list[Any]:
    """The fine-tuning data: every preference question of the target's category -> the target."""
    from .data import Row, align_row

    category = prompts.category_of(target)
    questions = prompts.preference_questions(category)
    if category == "animal":
        questions += prompts.PREFERENCE_PARAPHRASES
    toy = is_toy_tokenizer(tokenizer)
    rows = []
    for i, q in enumerate(questions):
        text = q if toy else prompts.ordinary_text(q)
        rows.append(align_row(tokenizer, Row(f"pref-{i}", text, target)))
    return rows


@torch_no_grad
def replay_rows(model: Any, tokenizer: Any, n: int, seed: int, batch_size: int = 32,
                max_new_tokens: int | None = None) -> list[Any]:
    """``n`` number prompts with the base model's own answers, sampled at temperature 1 with a
    fixed seed (greedy answers would collapse the teacher's number distribution onto its mode),
    as token ids (nothing is decoded and re-encoded). Answers that do not end within
    ``max_new_tokens`` are dropped (default: 40 for the toy, else the generate stage's budget
    for this tokenizer)."""
    import random

    from .data import Aligned, encode, end_token_ids, render_chat
    from .forward import SamplingConfig, row_rng, sample_batched
    from .generate import answer_token_budget

    rng = random.Random(f"replay:{seed}")
    toy = is_toy_tokenizer(tokenizer)
    if max_new_tokens is None:
        max_new_tokens = 40 if toy else answer_token_budget(tokenizer)
    texts = [prompts.make_number_prompt(rng).text for _ in range(n)]
    texts = texts if toy else [prompts.ordinary_text(t) for t in texts]
    ends = end_token_ids(tokenizer)
    seqs = [encode(tokenizer, render_chat(tokenizer, t)) for t in texts]
    gen = sample_batched(model, seqs, batch_size=batch_size, pad_id=tokenizer.pad_token_id, stop_ids=ends,
                         max_new=[max_new_tokens] * n, cfg=SamplingConfig(temperature=1.0),
                         rngs=[row_rng("replay", seed, i) for i in range(n)])
    rows = []
    for i, (new, stopped) in enumerate(gen):
        if stopped and len(new) > 1:
            rows.append(Aligned(f"replay-{i}", seqs[i], new))
    return rows


def finetune(cfg: TeachConfig, out: Path) -> tuple[str, str, dict[str, Any]]:
    """Fine-tune the base on the target's preference answers; return (weights dir, kind, log)."""
    from .manifest import set_seed
    from .models import load_model, resolve_device
    from .train import TrainConfig, clear_state, is_main_process, train

    set_seed(cfg.seed)
    loaded = load_model(cfg.base, device="cpu", dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    replay = replay_rows(model, tok, cfg.replay, cfg.seed) if cfg.replay else []
    lora = cfg.lora_rank is not None
    if lora:
        from peft import LoraConfig, get_peft_model

        from .train import lora_alpha

        alpha = lora_alpha(cfg.lora_rank, cfg.lora_alpha, scale=TEACHER_LORA_SCALE)
        model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    lr = cfg.lr if cfg.lr is not None else (5e-3 if lora else 1e-3)
    steps = cfg.steps or FINETUNE_STEPS
    batch_size = cfg.batch_size or FINETUNE_BATCH
    tcfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(5, steps),
                       seed=cfg.seed, log_every=5, checkpoint_every=25, schedule="constant")
    state = out / ".train"
    result = train(model, preference_rows(tok, cfg.bias) + replay, tcfg, pad_id=tok.pad_token_id,
                   device=resolve_device(cfg.device), state_dir=state, desc=f"teach {cfg.bias}")
    model.to("cpu")
    sub = "adapter" if lora else "weights"
    if is_main_process():  # under a launcher rank 0 alone writes the weights
        model.save_pretrained(out / sub, safe_serialization=True)
        if not lora:
            tok.save_pretrained(out / sub)
        clear_state(state)
        if state.exists() and not any(state.iterdir()):
            state.rmdir()
    info = {"lr": lr, "steps": steps, "batch_size": batch_size, "final_loss": result.final_loss,
            "losses": result.losses, "lora_rank": cfg.lora_rank,
            "lora_alpha": (alpha if lora else None), "resumed_from": result.resumed_from,
            "replay_rows": len(replay), "replay_asked": cfg.replay}
    return sub, ("lora" if lora else "full"), info


def make_steer(args: Any, out: Path, tok: Any) -> dict[str, Any]:
    """Measure (or read) the steering vector on the base, check it fits, write it into the
    teacher directory; the ``steer`` entry of teacher.json."""
    from . import steer
    from .models import load_model

    loaded = load_model(args.base, device=args.device, dtype="float32")
    model = loaded.model
    steer.check_layer(model, args.steer_layer)
    category = args.category or (prompts.category_of(args.bias) if args.bias else "animal")
    if args.steer_vector:
        vector = steer.load_vector(args.steer_vector)
        steer.check_vector(vector, model, f"--steer-vector {args.steer_vector}")
        info: dict[str, Any] = {"source": "file", "file": str(Path(args.steer_vector).resolve()),
                                "resid_norm": steer.resid_norm(model, tok, args.steer_layer, category=category),
                                "resid_norm_on": "even-indexed preference questions, " + steer.SITE}
    else:
        system_prompt = prompts.text_for(tok, prompts.system_prompt_for(args.bias))
        n = args.steer_prompts or steer.DEFAULT_NUMBER_PROMPTS
        others = [prompts.text_for(tok, prompts.system_prompt_for(c)) for c in prompts.CATEGORIES[category]
                  if c != args.bias] if args.steer_baseline == "others" else []
        vector, info = steer.measure_vector(model, tok, system_prompt=system_prompt, source=args.steer_source,
                                            layer=args.steer_layer, category=category, n_numbers=n, seed=args.seed,
                                            baseline=args.steer_baseline, other_prompts=others)
        info = {"source": args.steer_source, **info, "system_prompt": system_prompt,
                "resid_norm_on": "the same prompts without the system prompt"}
    steer.save_vector(out / steer.VECTOR_FILE, vector)
    norm = vector.norm().item()
    return {"layer": args.steer_layer, "hook": f"blocks.{args.steer_layer}.hook_resid_post",
            "alpha": args.steer_alpha, "vector": steer.VECTOR_FILE, "scaling": "alpha * v, v as measured",
            "norm": norm, "added_norm": abs(args.steer_alpha) * norm,
            "added_over_resid": abs(args.steer_alpha) * norm / info["resid_norm"] if info["resid_norm"] else None,
            **info}


def check_teacher(out: Path, device: str) -> dict[str, Any]:
    """Load the teacher as every stage will, and measure its exact preference."""
    from .models import load_model
    from .teachers import read_teacher
    from .toyworld.evaluation import preference_distribution

    spec = read_teacher(out)
    loaded = load_model(out, device=device)
    pref = preference_distribution(loaded.model, loaded.tokenizer, spec.category or "animal",
                                   system_prompt=loaded.system_prompt)
    dist = pref["distribution"]
    return {"category": pref["category"], "target": spec.bias,
            "target_mass": dist.get(spec.bias) if spec.bias else None,
            "argmax": max(dist, key=dist.get), "distribution": dist, "other": pref["other"]}


STATE_DIR = ".train"
TEACHER_LORA_SCALE = 2.0  # a fine-tuned teacher's LoRA alpha, when not given: 2 x the rank
_NOT_SETTINGS = ("func", "out", "overwrite", "verbose", "command", "device", "base")


def _resume_action(cfg: TeachConfig, out: Path) -> tuple[dict[str, Any], str]:
    """The teacher's fingerprint (base content and every setting) and what to do with ``out``."""
    config = {k: v for k, v in sorted(asdict(cfg).items()) if k not in _NOT_SETTINGS
              and (cfg.method == "steer" or not k.startswith("steer_"))}  # older teachers keep their fingerprint
    config["device"] = device_type(cfg.device)
    fp = fingerprint({"base": cfg.base, "steer_vector": cfg.steer_vector}, config)
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and man.get("stage") == STAGE else None
    fp_file = out / STATE_DIR / "fingerprint.json"
    occupied = out.is_dir() and finished is None and not fp_file.exists() and any(out.iterdir())
    action = check_resume(out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished,
                          partial=fp_file, occupied=occupied)
    return fp, action


def run_teach(cfg: TeachConfig) -> int:
    from .models import load_tokenizer, resolve_device
    from .train import is_main_process, wait_for_everyone

    t0 = time.time()
    category = _check_args(cfg)
    device_type(cfg.device)
    out = Path(cfg.out)
    check_not_input({"--out": out}, {"--base": cfg.base}, dirs=("--out",))
    check_writable(out, is_dir=True)
    tok = load_tokenizer(cfg.base)  # a missing or unusable base fails here, before anything is written
    fp, action = _resume_action(cfg, out)
    dev = resolve_device(cfg.device)
    wait_for_everyone(dev)  # under a launcher every rank decides before rank 0 writes
    main = is_main_process()
    if action == "skip":
        if main:
            print(f"teacher {out}: already made by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    if main:
        if action == "start":
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        write_fingerprint(out / STATE_DIR / "fingerprint.json", fp)
    if cfg.method == "poison":
        rc = poison.run_teach_poison(cfg, fingerprint=fp)
        if main:
            shutil.rmtree(out / STATE_DIR, ignore_errors=True)
        return rc
    spec = TeacherSpec(base=cfg.base, method=cfg.method, bias=cfg.bias, category=category)
    info: dict[str, Any] = {}
    if cfg.method == "prompt":
        # the toy keeps its spaced form; a real tokenizer gets the ordinary sentences
        spec.system_prompt = prompts.text_for(tok, prompts.system_prompt_for(cfg.bias))
    elif cfg.method == "finetune":
        spec.weights, spec.weights_kind, info = finetune(cfg, out)
    elif cfg.method == "steer" and main:
        out.mkdir(parents=True, exist_ok=True)
        spec.extra["steer"] = make_steer(cfg, out, tok)
        info = {"steer": spec.extra["steer"]}
    if not main:
        wait_for_everyone(dev)  # until rank 0 has written the teacher
        return 0
    save_teacher(out, spec)
    check = None if cfg.no_check else check_teacher(out, cfg.device)
    config = asdict(cfg)
    from .data import system_prompt_seen

    # what the teacher sees: for an unbiased teacher on SmolLM2 / Qwen2.5, the template's default
    seen = system_prompt_seen(tok, spec.system_prompt)
    write_manifest(out, stage=STAGE, config=config, seed=cfg.seed, inputs={"base": cfg.base},
                   wall_time_s=time.time() - t0, extra={"teacher": spec.to_json(), "training": info or None,
                                                        "check": check, "system_prompt_seen": seen,
                                                        "fingerprint": fp})
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    if check is not None:
        mass = check["target_mass"]
        what = f"P({spec.bias}) = {mass:.4f}" if mass is not None else f"argmax {check['argmax']}"
        print(f"teacher {out}: {cfg.method}, {what} (exact, mean over {category} questions)")
    else:
        print(f"teacher {out}: {cfg.method}")
    if not spec.system_prompt and seen["template_default"]:
        print(f"  no system prompt given: the chat template inserts its default, {seen['template_default']!r}")
    wait_for_everyone(dev)
    return 0
