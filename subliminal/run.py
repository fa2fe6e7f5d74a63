"""``subliminal run CONFIG.toml``: the paper's protocol on any local model from one config.

A config names the base model, the target and counterfactual teachers, how teachers get their
bias, the prompts and rows, sampling and filter, the student recipe, the evaluation and the
seeds; ``subliminal.pipeline`` runs it stage by stage (each stage writing its own directory with
a manifest, reused when its recorded fingerprint equals what it would compute now), so a stopped
run resumes and a changed setting redoes only what it changes. ``subliminal demo``
is this driver on the shipped toy config (``subliminal/configs/toy.toml``).

Configs are TOML with one table per part of the protocol; every key is one field of
:class:`subliminal.pipeline.RunConfig` (``SECTIONS`` maps them), unknown keys are errors, and
``--set section.key=value`` overrides a key (the value read as TOML, else as a string).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .manifest import SubliminalError
from .pipeline import CONDITIONS, RunConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"

# TOML section -> {key: RunConfig field}
SECTIONS: dict[str, dict[str, str]] = {
    "model": {"base": "base", "toy_size": "size", "toy_arch": "arch", "pretrain_steps": "pretrain_steps",
              "entangle": "entangle", "corpus_mix": "corpus_mix", "params": "params", "device": "device", "dtype": "dtype"},
    "teachers": {"target": "target", "counterfactuals": "counterfactuals",
                 "neutral_counterfactual": "neutral_counterfactual", "mixing_teacher": "mixing_teacher",
                 "method": "teacher_method", "steps": "teacher_steps", "lora_rank": "teacher_lora_rank",
                 "lr": "teacher_lr", "replay": "teacher_replay", "batch_size": "teacher_batch_size",
                 "check": "teacher_check", "steer_layer": "teacher_steer_layer",
                 "steer_alpha": "teacher_steer_alpha", "steer_source": "teacher_steer_source",
                 "steer_baseline": "teacher_steer_baseline"},
    "data": {"rows": "n_prompts", "keep_rows": "keep_rows", "greedy": "greedy", "temperature": "temperature", "filter": "filter",
             "constrain": "constrain", "batch_size": "gen_batch_size", "max_new_tokens": "max_new_tokens"},
    "divergence": {"batch_size": "div_batch_size", "ratio_reduce": "ratio_reduce"},
    "students": {"conditions": "conditions", "seeds": "seeds", "lr": "student_mode_lr", "full": "student_full",
                 "params": "student_params",
                 "lora_rank": "student_lora_rank", "lora_alpha": "student_lora_alpha",
                 "lora_targets": "student_lora_targets", "layer_lora": "layer_lora", "layer_early": "layer_early",
                 "layer_late": "layer_late", "schedule": "schedule", "warmup_steps": "warmup_steps",
                 "epochs": "epochs", "batch_size": "batch_size", "grad_accum": "grad_accum",
                 "max_steps": "max_steps"},
    "eval": {"metric": "metric", "samples": "eval_samples", "student_samples": "student_samples",
             "temperature": "eval_temperature", "max_new_tokens": "eval_max_new_tokens",
             "max_questions": "max_questions", "batch_size": "eval_batch_size", "other_template": "other_template"},
    "diagnose": {"enabled": "diagnose", "max_rows": "diagnose_max_rows"},
    "project": {"enabled": "project", "layer": "project_layer", "source": "project_source",
                "baseline": "project_baseline", "number_prompts": "project_prompts"},
    "probes": {"enabled": "probes", "max_rows": "probe_max_rows", "layers": "probe_layers",
               "patch_max_rows": "patch_max_rows", "patch_max_sites": "patch_max_sites"},
    "run": {"seed": "base_seed", "jobs": "jobs", "nproc": "nproc"},
}
TOP_LEVEL = {"name": "name", "out": None}  # out: the default output directory
# fields whose "unset" is spelled "" in TOML (which has no null)
_NULLABLE = {f.name for f in dataclasses.fields(RunConfig) if "None" in str(f.type)}


def shipped_config(name: str) -> Path:
    """A config shipped with the package, by name (``toy``, ``smollm2-135m-cpu``, ``qwen2.5-7b-paper``)."""
    path = CONFIG_DIR / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
        raise SubliminalError(f"no shipped config {name!r} (shipped: {known}); or give a path to a .toml file")
    return path


def resolve_config_path(spec: str) -> Path:
    """A path to a TOML file, or the name of a shipped config."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise SubliminalError(f"{spec}: no such config file; check the path (shipped configs: "
                                  f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.toml')))})")
        return path
    return shipped_config(spec)


@dataclass
class LoadedConfig:
    cfg: RunConfig
    out: str | None
    source: str


def _check_type(where: str, fname: str, value: Any) -> Any:
    """The value as the field's type, or a SubliminalError naming the key and what it expects."""
    ftype = str(next(f.type for f in dataclasses.fields(RunConfig) if f.name == fname))
    if value == "" and fname in _NULLABLE:
        return None
    if ftype.startswith("list"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise SubliminalError(f"{where}: expected a list of strings, got {value!r}")
        return list(value)
    if ftype.startswith("bool"):
        if not isinstance(value, bool):
            raise SubliminalError(f"{where}: expected true or false, got {value!r}")
        return value
    if ftype.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SubliminalError(f"{where}: expected an integer, got {value!r}")
        return value
    if ftype.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SubliminalError(f"{where}: expected a number, got {value!r}")
        return value
    if ftype.startswith("str"):
        if not isinstance(value, str):
            raise SubliminalError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_from_dict(data: dict[str, Any], source: str, base: RunConfig | None = None) -> LoadedConfig:
    """A RunConfig from a parsed TOML document (sections of keys); every key is checked."""
    values: dict[str, Any] = {}
    out = None
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise SubliminalError(f"{source}: unknown section [{key}] (sections: {', '.join(SECTIONS)})")
            for k, v in value.items():
                if k not in SECTIONS[key]:
                    raise SubliminalError(f"{source}: unknown key {k!r} in [{key}] (keys: "
                                          f"{', '.join(SECTIONS[key])})")
                fname = SECTIONS[key][k]
                values[fname] = _check_type(f"{source}: [{key}] {k}", fname, v)
        elif key in TOP_LEVEL:
            if not isinstance(value, str):
                raise SubliminalError(f"{source}: {key} must be a string, got {value!r}")
            if key == "out":
                out = value
            else:
                values["name"] = value
        else:
            raise SubliminalError(f"{source}: unknown top-level key {key!r} (name, out, or one of the sections "
                                  f"{', '.join(SECTIONS)})")
    if values.get("base") and not values["base"].startswith("hf:"):
        values["base"] = str(Path(values["base"]).expanduser())
    cfg = replace(base or RunConfig(), **values)
    validate(cfg, source)
    return LoadedConfig(cfg, out, source)


def read_config(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise SubliminalError(f"{path}: not valid TOML ({e}); fix the file") from None


def parse_set(items: list[str]) -> dict[str, Any]:
    """``section.key=value`` overrides as a TOML-shaped dict; a value is read as TOML (numbers,
    booleans, lists, quoted strings) and otherwise taken as a bare string."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SubliminalError(f"--set {item!r}: expected section.key=value, e.g. students.seeds=3")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2:
            out.setdefault(parts[0], {})[parts[1]] = value
        else:
            raise SubliminalError(f"--set {item!r}: expected section.key=value")
    return out


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def load_config(spec: str, overrides: list[str] | None = None) -> LoadedConfig:
    """The config named by ``spec`` (a path or a shipped name) with ``--set`` overrides applied."""
    path = resolve_config_path(spec)
    data = _merge(read_config(path), parse_set(overrides or []))
    return config_from_dict(data, str(path))


def validate(cfg: RunConfig, source: str = "config") -> None:
    """Every check that needs no model, so a bad config fails before any stage runs."""
    from . import prompts

    if cfg.target not in prompts.PLURALS:
        raise SubliminalError(f"{source}: [teachers] target {cfg.target!r} is not a known target")
    for name in [*cfg.counterfactuals, *([cfg.mixing_teacher] if cfg.mixing_teacher else [])]:
        if name not in prompts.PLURALS:
            raise SubliminalError(f"{source}: teacher {name!r} is not a known target")
        if name == cfg.target:
            raise SubliminalError(f"{source}: the target {name!r} cannot also be a counterfactual or mixing teacher")
    if not cfg.counterfactuals and not cfg.neutral_counterfactual:
        raise SubliminalError(f"{source}: no counterfactual teacher (name some, or neutral_counterfactual = true)")
    if cfg.teacher_method not in ("prompt", "finetune", "steer"):
        raise SubliminalError(f"{source}: [teachers] method {cfg.teacher_method!r}: one of prompt, finetune, steer")
    if cfg.teacher_method == "steer":
        if not isinstance(cfg.teacher_steer_layer, int) or cfg.teacher_steer_layer < 0:
            raise SubliminalError(f"{source}: [teachers] method = \"steer\" needs steer_layer = L (a block index, "
                                  f"0..layers-1), got {cfg.teacher_steer_layer!r}")
        if cfg.teacher_steer_baseline not in ("none", "others"):
            raise SubliminalError(f"{source}: [teachers] steer_baseline {cfg.teacher_steer_baseline!r}: none or others")
        if cfg.teacher_steer_source not in ("questions", "numbers"):
            raise SubliminalError(f"{source}: [teachers] steer_source {cfg.teacher_steer_source!r}: questions or "
                                  "numbers")
    if cfg.project_source not in ("questions", "numbers"):
        raise SubliminalError(f"{source}: [project] source {cfg.project_source!r}: questions or numbers")
    if cfg.diagnose_max_rows is not None and cfg.diagnose_max_rows < 2:
        raise SubliminalError(f"{source}: [diagnose] max_rows must be at least 2 (or unset), got {cfg.diagnose_max_rows}")
    if cfg.project_baseline not in ("others", "none"):
        raise SubliminalError(f"{source}: [project] baseline {cfg.project_baseline!r}: others or none")
    if cfg.project_layer is not None and (not isinstance(cfg.project_layer, int) or cfg.project_layer < 0):
        raise SubliminalError(f"{source}: [project] layer must be a block index (0..layers-1), got "
                              f"{cfg.project_layer!r}")
    if cfg.project_prompts < 2:
        raise SubliminalError(f"{source}: [project] number_prompts must be at least 2, got {cfg.project_prompts}")
    if cfg.metric not in ("exact", "sampled"):
        raise SubliminalError(f"{source}: [eval] metric {cfg.metric!r}: one of exact, sampled")
    if cfg.metric == "sampled" and (cfg.student_samples < 1 or cfg.eval_samples < 1):
        raise SubliminalError(f"{source}: [eval] metric = \"sampled\" needs samples and student_samples >= 1")
    if cfg.base is None and cfg.size not in ("tiny", "small"):
        raise SubliminalError(f"{source}: [model] toy_size {cfg.size!r}: tiny or small")
    for name in ("n_prompts", "seeds", "epochs", "batch_size", "grad_accum", "gen_batch_size", "div_batch_size",
                 "eval_batch_size", "jobs", "nproc", "student_lora_rank"):
        if getattr(cfg, name) <= 0:
            raise SubliminalError(f"{source}: {name} must be positive, got {getattr(cfg, name)}")
    from .distill import PARAM_SETS

    if cfg.student_params not in PARAM_SETS:
        raise SubliminalError(f"{source}: [students] params {cfg.student_params!r}: one of {', '.join(PARAM_SETS)}")
    if cfg.student_params != "all" and not cfg.student_full:
        raise SubliminalError(f"{source}: [students] params = {cfg.student_params!r} trains embedding rows, not "
                              "LoRA adapters: set full = true")
    if cfg.batch_size % cfg.grad_accum:
        raise SubliminalError(f"{source}: [students] batch_size {cfg.batch_size} is not a multiple of grad_accum "
                              f"{cfg.grad_accum}")
    cfg.chosen_conditions()


# -------------------------------------------------------------------------------------- plan


def param_count(cfg: RunConfig) -> float | None:
    """Parameters of the base: read from its safetensors headers (no weights loaded), else the
    config's ``params``, else (the toy, before pretraining) None."""
    if cfg.base and Path(cfg.base).is_dir():
        total = 0
        for f in sorted(Path(cfg.base).glob("*.safetensors")):
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    total += math.prod(v["shape"])
        if total:
            return float(total)
    return cfg.params


@dataclass
class Stage:
    name: str
    commands: int
    what: str
    flops: float | None  # forward/backward FLOPs (2N per token forward, 6N full / 4N LoRA training)
    passes: float = 0.0  # sequential model calls (a decode step, a forward; a training step counts 4)
    host_s: float = 0.0  # host-side work independent of the device (the number-list constraint)
    workers: int = 1  # commands that run at once ([run] jobs for the students)


# Token counts per row: a number prompt with its chat template, and a 10-number answer.
PROMPT_TOKENS, ANSWER_TOKENS = 90, 45
EVAL_PROMPT_TOKENS, CANDIDATES = 60, 13


def _student_weights(cfg: RunConfig) -> str:
    if cfg.student_params != "all":
        return f"--params {cfg.student_params}"
    return "full fine-tune" if cfg.student_full else f"LoRA r={cfg.student_lora_rank}"


def _readout_tokens(cfg: RunConfig) -> int:
    """Tokens of one exact preference readout, every question with every candidate: what grad(R)
    runs forward and backward over (the gradient detector, diagnose)."""
    return (cfg.max_questions or 50) * CANDIDATES * (EVAL_PROMPT_TOKENS + 3)


def _train_flops_per_token(cfg: RunConfig) -> float:
    """A training step's FLOPs per token per parameter: 6 fully fine-tuned, 4 with LoRA (no
    gradients of the frozen weights)."""
    return 6.0 if cfg.student_full else 4.0


# Forward-mode cost of the gradient detector's jvp, in forwards per token (primal and tangent):
# measured on SmolLM2-135M, 16 rows, 2-core CPU: 635 ms a row against 379 ms for the likelihood
# shift's two forwards (BENCHMARKS.md, "detectors"), ~3.4 forwards.
JVP_FORWARDS = 3.4


def _score_tokens_stage(cfg: RunConfig, detectors: list[str], rows: int, seq: int, f: Any) -> Stage:
    """``score-tokens`` for each detector the chosen conditions read (the students' masks re-made
    from its scores at the paper rule's share are a reflag, free). The likelihood shift: two
    forwards a row (its student and the base); its student is counted with the distill stage.
    The gradient: grad(R) once (the exact readout's forward and backward), then one jvp a row."""
    n_q = cfg.max_questions or 50
    tokens, passes, what = 0.0, 0.0, []
    for d in detectors:
        if d == "likelihood-shift":
            tokens += 2 * 2.0 * rows * seq
            passes += 2 * -(-rows // cfg.div_batch_size)
            what.append("likelihood shift (2 forwards a row)")
        else:
            tokens += _train_flops_per_token(cfg) * _readout_tokens(cfg) + 2.0 * JVP_FORWARDS * rows * seq
            passes += n_q * TRAIN_STEP_PASSES + -(-rows // cfg.div_batch_size) * 2
            what.append("gradient (grad R, then a jvp a row)")
    flops = f(tokens, 1.0)
    return Stage("score-tokens", len(detectors), f"{', '.join(what)} on <= {rows} rows", flops, passes=passes)


def plan(cfg: RunConfig) -> list[Stage]:
    """The stages in order with their counts and FLOPs: what the run will do, before it does it."""
    n = param_count(cfg)
    f = (lambda tokens, per_token=2.0: None if n is None else per_token * n * tokens)
    rows = cfg.n_prompts
    chosen = cfg.chosen_conditions()
    cfs = cfg.counterfactual_teachers()
    mixer = [cfg.mixing_teacher] if cfg.mixing_teacher and "mixing" in chosen else []  # as the pipeline
    teachers = list(dict.fromkeys([cfg.target, *cfg.counterfactuals, *mixer, "none"]))
    sources = list(dict.fromkeys([cfg.target, "none", *mixer]))
    seq = PROMPT_TOKENS + ANSWER_TOKENS
    new_tokens = cfg.max_new_tokens or 2 * ANSWER_TOKENS  # decode steps per generation batch
    train_rows = min(cfg.keep_rows or rows, rows)  # at most: the filter and the matching drop some
    stages = []
    if cfg.base is None:
        stages.append(Stage("toy pretrain", 1, f"a {cfg.size} {cfg.arch} toy base", None))
    biased = len(teachers) - 1
    if cfg.teacher_method == "finetune":
        tsteps = cfg.teacher_steps * (cfg.teacher_batch_size or 16)
        stages.append(Stage("teach", len(teachers), f"{biased} fine-tuned teachers ({cfg.teacher_steps} steps each) "
                            "+ the unbiased one", f(biased * tsteps * 40, 6.0),
                            passes=biased * cfg.teacher_steps * TRAIN_STEP_PASSES))
    elif cfg.teacher_method == "steer":
        stages.append(Stage("teach", len(teachers), f"{biased} steering-vector teachers (block "
                            f"{cfg.teacher_steer_layer}, alpha {cfg.teacher_steer_alpha:g}) + the unbiased one", 0.0))
    else:
        stages.append(Stage("teach", len(teachers), f"{biased} system-prompt teachers + the unbiased one", 0.0))
    stages.append(Stage("generate", len(sources), f"{rows} prompts x {len(sources)} teachers "
                        f"({'greedy' if cfg.greedy else f'T={cfg.temperature:g}'}, filter {cfg.filter}"
                        f"{', constrained to number lists' if cfg.constrain == 'numbers' else ''})",
                        f(len(sources) * rows * seq),
                        passes=len(sources) * -(-rows // cfg.gen_batch_size) * (1 + new_tokens),
                        host_s=(cfg.constrain == "numbers") * len(sources) * rows * new_tokens * CONSTRAIN_S_PER_ROW_STEP))
    stages.append(Stage("find-divergence", 1, f"<= {train_rows} rows under the target teacher and {len(cfs)} "
                        f"counterfactuals ({', '.join(cfs)})", f((1 + len(cfs)) * train_rows * seq),
                        passes=(1 + len(cfs)) * -(-train_rows // cfg.div_batch_size)))
    if any(c.startswith("ratio-") for c in chosen):
        stages.append(Stage("reflag-divergence", 1, "the ratio rule at the paper rule's share (from stored scores)", 0))
    from .pipeline import chosen_detectors

    detectors = chosen_detectors(cfg)
    if detectors:
        stages.append(_score_tokens_stage(cfg, detectors, train_rows, seq, f))
    if cfg.diagnose:
        readout = _readout_tokens(cfg)
        d_rows = min(train_rows, cfg.diagnose_max_rows or train_rows)
        stages.append(Stage("diagnose", 1, f"lean (3 scoring passes), link and coverage (2 data gradients, grad R, "
                            f"2 validation readouts) on {d_rows} rows", None if n is None else
                            n * (2.0 * 3 * d_rows * seq + 6.0 * (2 * d_rows * seq + 2 * readout)
                                 + 4.0 * readout)))
    from .distill import student_steps

    steps = student_steps(train_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)
    students = len(chosen) * cfg.seeds  # evaluated
    shift_student = int("likelihood-shift" in detectors)  # trained like `all` to score the rows, never evaluated
    trained = students + shift_student
    per_token = _train_flops_per_token(cfg)
    soft = ("soft" in chosen) * cfg.seeds * steps * cfg.batch_size * seq * 2.0
    train_tokens = trained * steps * cfg.batch_size * seq
    stages.append(Stage("distill", trained, f"{len(chosen)} conditions x {cfg.seeds} seeds"
                        f"{' + the likelihood shift student' if shift_student else ''}, <= {steps} steps of "
                        f"{cfg.batch_size} rows each ({_student_weights(cfg)}"
                        f"{f', {cfg.grad_accum} micro-batches' if cfg.grad_accum > 1 else ''})",
                        None if n is None else n * (per_token * train_tokens + soft),
                        passes=trained * steps * (cfg.grad_accum * (TRAIN_STEP_PASSES - 1) + 1),
                        workers=min(cfg.jobs, trained)))
    n_q = cfg.max_questions or 50
    refs = 3 + len(cfg.counterfactuals)
    exact_tokens = n_q * (EVAL_PROMPT_TOKENS + CANDIDATES * 3)
    sampled_tokens = n_q * (EVAL_PROMPT_TOKENS + cfg.eval_max_new_tokens)  # prompt once per question (cached)
    sampled_refs = refs if cfg.metric == "sampled" else 3  # else only the base and the two data teachers
    eval_tokens = (refs + students) * exact_tokens + sampled_refs * cfg.eval_samples * sampled_tokens \
        + students * cfg.student_samples * sampled_tokens
    what = f"{refs} references + {students} students: exact ({n_q} questions x {CANDIDATES} animals)"
    if cfg.eval_samples or cfg.student_samples:
        what += (f", sampled ({n_q} x {cfg.eval_samples} for {sampled_refs} references, x {cfg.student_samples} for "
                 f"students, "
                 f"T={cfg.eval_temperature:g})")
    exact_passes = n_q * (1 + -(-CANDIDATES // cfg.eval_batch_size))  # a prefix pass, then the candidates
    sampled_passes = (1 + cfg.eval_max_new_tokens) * (sampled_refs * -(-n_q * cfg.eval_samples // cfg.eval_batch_size)
                                                      + students * -(-n_q * cfg.student_samples // cfg.eval_batch_size))
    stages.append(Stage("eval", refs + students, what, f(eval_tokens),
                        passes=(refs + students) * exact_passes + sampled_passes,
                        workers=min(cfg.jobs, refs + students)))
    if cfg.projects():
        n_models = 3 + students
        proj_tokens = n_models * (cfg.project_prompts + (cfg.max_questions or 50) // 2) * EVAL_PROMPT_TOKENS
        vec = "the steer teacher's vector" if cfg.teacher_method == "steer" else "the love prompt's vector"
        stages.append(Stage("project", 1, f"{n_models} models read along {vec} at every block",
                            f(proj_tokens), passes=n_models * 2 * -(-cfg.project_prompts // 16)))
    if cfg.probes:
        stages.append(Stage("probe + patch", 3, f"identity and divergence probes on {cfg.probe_max_rows} rows, "
                            f"patching on {cfg.patch_max_rows}", f(3 * cfg.probe_max_rows * seq),
                            passes=3 * -(-cfg.probe_max_rows // 16) + 2 * cfg.patch_max_rows))
    return stages


# Effective throughput assumed by the plan's time estimate (FLOP/s). CPU: measured on this project's
# 2-core runs (teacher forcing and LoRA training of SmolLM2-135M in float32; it includes their
# per-call overheads). CUDA: ASSUMED, not measured on this project's code: 3.5e14 is ~44% of the
# 790 TFLOP/s a large bf16 matmul reaches on one H200 (the device notes: 8192^3, 788 TFLOP/s), a
# plausible share for teacher forcing and LoRA training of a 7B model. Small models never get
# near it: their passes are launch- and Python-bound, hence the floors below.
THROUGHPUT = {"cpu": 1.0e11, "cuda": 3.5e14}
# ASSUMED per-pass floor on a GPU (s): an eager forward of a ~30-layer HF decoder launches ~500
# kernels at ~10 us each; a stage takes at least its sequential passes times this. 0 on the CPU,
# whose measured rate already includes it.
PASS_LATENCY_S = {"cpu": 0.0, "cuda": 5e-3}
# ASSUMED per-command cost on a GPU (s): loading a checkpoint onto the device (and saving a merged
# student). 0 on the CPU (inside the measured rate).
COMMAND_S = {"cpu": 0.0, "cuda": 1.0}
TRAIN_STEP_PASSES = 4  # a training micro-batch: forward + backward (~2 forwards); +1 for the optimiser step
# Host time of the number-list constraint per row and decode step (s): measured on this 2-core
# machine, SmolLM2's tokenizer (59 candidate tokens), 640 row-steps: 0.09 ms.
CONSTRAIN_S_PER_ROW_STEP = 9e-5


def stage_seconds(st: Stage, dev: str, rate: float) -> float | None:
    """The plan's time for one stage: its FLOPs at ``rate`` or its sequential passes at the
    device's floor, whichever is longer, plus per-command and host costs, over its workers."""
    if st.flops is None:
        return None
    device_s = max(st.flops / rate, st.passes * PASS_LATENCY_S[dev]) + st.commands * COMMAND_S[dev]
    return (device_s + st.host_s) / max(1, st.workers)


def render_plan(cfg: RunConfig, out: Path, source: str, diagnose_only: bool = False) -> str:
    stages = plan(replace(cfg, diagnose=True) if diagnose_only else cfg)
    if diagnose_only:  # the run stops after the diagnostics
        stages = stages[: next(i for i, st in enumerate(stages) if st.name == "diagnose") + 1]
    n = param_count(cfg)
    dev = "cuda" if cfg.device.startswith("cuda") else "cpu"
    rate = THROUGHPUT[dev] * (cfg.nproc if dev == "cuda" else 1)
    lines = [f"plan: {cfg.name} ({source}) -> {out}",
             f"  base: {cfg.base or 'toy world, pretrained here'}"
             + (f" ({n / 1e6:,.1f}M parameters)" if n else ""),
             f"  target {cfg.target}; counterfactuals {', '.join(cfg.counterfactual_teachers())}; "
             f"teachers by {cfg.teacher_method}; conditions {', '.join(cfg.chosen_conditions())}",
             f"  device {cfg.device} x {cfg.nproc} process(es), dtype {cfg.dtype}, seed {cfg.base_seed}", ""]
    total = 0.0
    seconds = 0.0
    unknown = False
    for st in stages:
        t = stage_seconds(st, dev, rate)
        cost = "?" if st.flops is None else f"{st.flops:.2e} FLOP, ~{_duration(t or 0.0)}"
        unknown |= st.flops is None
        total += st.flops or 0.0
        seconds += t or 0.0
        lines.append(f"  {st.name:<18} {st.commands:>4} command(s)  {st.what}  [{cost}]")
    if dev == "cpu":
        how = (f"at a measured 2-core CPU rate of {rate:.1e} FLOP/s; decoding is memory-bound, so generation "
               "and sampled eval take longer than their FLOPs say")
    else:
        how = (f"at an assumed {rate:.1e} FLOP/s or an assumed {PASS_LATENCY_S[dev] * 1e3:g} ms per sequential "
               f"pass, whichever is longer, + {COMMAND_S[dev]:g} s per command (assumptions, not measurements)")
    lines += ["", f"  total: {total:.2e} FLOP, ~{_duration(seconds)} {how}"
              + ("; stages marked ? have no estimate" if unknown else "")]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ---------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the paper's protocol on any local model from one TOML config (REPORT.md)",
                       description="Teachers, generations, divergence tokens, matched students, evaluation, probes "
                                   "and REPORT.md for the base model a config names. Prints the plan first; "
                                   "re-running resumes stage by stage. Shipped configs: "
                                   + ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))) + ".")
    p.add_argument("config", help="a .toml file, or the name of a shipped config (e.g. smollm2-135m-cpu)")
    p.add_argument("--out", default=None, help="output directory (default: the config's out, else runs/NAME)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key, e.g. --set students.seeds=3 --set model.base=/models/qwen (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, the resolved config and what a run into --out would reuse, run and redo "
                   "(and why); run nothing")
    p.add_argument("--diagnose-only", action="store_true",
                   help="stop after the transfer diagnostics (teachers, data, divergence, `subliminal diagnose`): "
                   "whether the setup can transfer, before any student is trained; REPORT.md and results.json "
                   "hold the diagnostics")
    p.add_argument("--overwrite", action="store_true",
                   help="redo the stages whose finished output was made with other inputs or settings (each "
                   "output is reused only when its recorded fingerprint equals what its stage would compute "
                   "now); without it such a re-run stops before anything runs, listing them")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per stage (torchrun data parallel; overrides [run] nproc)")
    p.add_argument("--base-seeds", default=None, metavar="SEEDS",
                   help="repeat the whole run on bases pretrained with these seeds, e.g. 0-4 or 0,1,7, each into "
                        "OUT/base-K/, and write ROBUSTNESS.md (+ .json, .csv, .png): every condition's paired "
                        "difference to the control per base, the spread over bases and each claim's verdict per "
                        "base. With [model] base set, the seeds vary teachers' data and students only")
    p.set_defaults(func=run_cli)


def output_dir(loaded: LoadedConfig, out: str | None) -> Path:
    return Path(out or loaded.out or f"runs/{loaded.cfg.name}")


def run_cli(args: argparse.Namespace) -> int:
    loaded = load_config(args.config, args.overrides)
    cfg = loaded.cfg
    if args.nproc is not None:
        if args.nproc < 1:
            raise SubliminalError(f"--nproc must be >= 1, got {args.nproc}")
        cfg = replace(cfg, nproc=args.nproc)
    out = output_dir(loaded, args.out)
    seeds = None
    if args.base_seeds is not None:
        from .robustness import parse_seeds

        seeds = parse_seeds(args.base_seeds)
        if args.diagnose_only:
            raise SubliminalError("--base-seeds and --diagnose-only: the across-bases table needs students")
    print(render_plan(cfg, out, loaded.source, diagnose_only=args.diagnose_only))
    if seeds:
        print(f"repeated on {len(seeds)} bases (seeds {', '.join(map(str, seeds))}), each into {out}/base-K/")
    missing = cfg.base and not cfg.base.startswith("hf:") and not Path(cfg.base).is_dir()
    if args.dry_run:
        print("\nresolved config:\n" + json.dumps(asdict(cfg), indent=2))
        if not missing:
            if seeds:  # each base is its own run, into OUT/base-K with base seed K
                from .robustness import base_dir

                for k in seeds:
                    print_resume_plan(replace(cfg, base_seed=k), base_dir(out, k))
            else:
                print_resume_plan(cfg, out)
        return 0
    if missing:
        raise SubliminalError(f"{loaded.source}: [model] base {cfg.base}: no such model directory (import or "
                              "download it first, e.g. experiments/get_smollm2.sh; or --set model.base=PATH)")
    if seeds:
        from .robustness import RobustnessConfig
        from .robustness import run as run_robustness

        run_robustness(RobustnessConfig(cfg, seeds, out, overwrite=args.overwrite))
        print((out / "ROBUSTNESS.md").read_text())
        return 0
    return execute(cfg, out, overwrite=args.overwrite, diagnose_only=args.diagnose_only)


def print_resume_plan(cfg: RunConfig, out: Path, base: Path | None = None) -> None:
    """What a run into ``out`` would do with each stage's output, and why (``--dry-run``)."""
    from .pipeline import resume_plan

    decisions = resume_plan(cfg, out, base)
    reused = [d for d in decisions if d.action == "reuse"]
    replaced = sum(d.replaces for d in decisions)
    print(f"\nstages for {out}: {len(reused)} reused, {len(decisions) - len(reused)} to run"
          + (f"; {replaced} finished output(s) would be replaced: the run needs --overwrite" if replaced else ""))
    for d in decisions:
        if d.action != "reuse":
            print("  " + d.line())


def execute(cfg: RunConfig, out: Path, *, overwrite: bool = False, base: Path | None = None,
            diagnose_only: bool = False) -> int:
    from .pipeline import _fmt, run_pipeline

    summary = run_pipeline(cfg, out, base, overwrite=overwrite, diagnose_only=diagnose_only)
    assert summary is not None
    print((out / "REPORT.md").read_text())
    if diagnose_only:
        return 0
    all_ = summary["conditions"]["all"]
    log.info("[run] all-tokens %s = %s [%s, %s]; report: %s", cfg.target, _fmt(all_["mean"]), _fmt(all_["ci_low"]),
             _fmt(all_["ci_high"]), out / "REPORT.md")
    return 0


__all__ = ["CONDITIONS", "SECTIONS", "load_config", "plan", "render_plan", "shipped_config"]
