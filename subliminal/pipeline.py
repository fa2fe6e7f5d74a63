"""The protocol as a pipeline of stages: what ``subliminal run`` and ``subliminal demo`` execute.

The pipeline drives the same stages a user would run (``toy pretrain`` when there is no base,
``teach``, ``generate``, ``find-divergence``, ``reflag-divergence``, ``distill``, ``eval``,
``probe``, ``patch``), most as functions with the stage's typed config, each writing its own
directory with a manifest, so every intermediate can be inspected, re-run or swapped. Whether a
stage runs is :mod:`subliminal.driver`'s one rule: its output is reused only when the fingerprint
recorded with it equals what the stage would compute now; a changed setting redoes exactly the
stages whose fingerprint changed and those downstream, and replacing a finished output needs
``--overwrite``.

All student conditions are matched: the same rows (by id, in the same seeded order), the same
number of optimiser steps, the same seeds; they differ only in the data source, the loss mask or
the trainable subset. Transfer is read out against the control student trained on the unbiased
teacher's data, never against the base model, paired by seed.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .driver import DISTRIBUTED, Decision, Runner, StageCall, launch_argv  # noqa: F401 -- re-exported
from .manifest import (
    SubliminalError,
    check_file_resume,
    check_resume,
    fingerprint,
    read_json,
    read_manifest,
    write_file_manifest,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)

log = logging.getLogger(__name__)

CONDITIONS = [
    "control", "all", "no-divergence", "only-divergence", "random-matched",
    "layer-early", "layer-late", "soft", "paraphrase", "mixing",
    "ratio-no-divergence", "ratio-only-divergence", "ratio-random-matched",
    "shift-no-divergence", "shift-only-divergence", "shift-random-matched",
    "gradient-no-divergence", "gradient-only-divergence", "gradient-random-matched",
    "replace-divergence", "replace-random-matched", "corrupt-divergence", "corrupt-random-matched",
    "holder", "holder-uniform",
]
# Trained only when named (--conditions / [students] conditions): the interventions of issue 26 on the
# paper rule's flags and the masks of its two other detectors (experiments/detector_table.py runs every
# detector x intervention from a finished run); asking for one condition of a detector scores the rows with it.
OPT_IN_CONDITIONS = ("shift-no-divergence", "shift-only-divergence", "shift-random-matched",
                     "gradient-no-divergence", "gradient-only-divergence", "gradient-random-matched",
                     "replace-divergence", "replace-random-matched", "corrupt-divergence", "corrupt-random-matched",
                     "holder", "holder-uniform")
# Students on rows the toy world's own authors wrote for the same prompts (subliminal.toyworld.holder):
# their paired difference is the true-trait-holder link of issue 31, what a perfectly leaning teacher
# could pass on through this base. Toy world only; asking for one trains both.
HOLDER_CONDITIONS = ("holder", "holder-uniform")
CONDITION_TEXT = {
    "control": "hard distillation on the unbiased teacher's data",
    "all": "hard distillation on the owl teacher's data, every completion token",
    "no-divergence": "as all, divergence tokens masked out of the loss",
    "only-divergence": "as all, loss on divergence tokens only",
    "random-matched": "as all, as many non-divergence tokens masked per row as no-divergence masks",
    "layer-early": "as all, only the first block trained (all its weights; LoRA r=8 with --layer-lora)",
    "layer-late": "as all, only the last block trained (all its weights; LoRA r=8 with --layer-lora)",
    "soft": "soft distillation: KL to the owl teacher's full next-token distribution",
    "paraphrase": "as all, prompts redrawn from other templates (same completions)",
    "mixing": "as all, half the rows replaced by another teacher's data for the same prompts",
    "ratio-no-divergence": "as no-divergence, the flags from the likelihood-ratio rule at the paper rule's share",
    "ratio-only-divergence": "as only-divergence, the flags from the likelihood-ratio rule at the paper rule's share",
    "ratio-random-matched": "as random-matched, as many tokens per row as ratio-no-divergence masks",
    "shift-no-divergence": "as no-divergence, the flags from the likelihood shift (log p_student - log p_base of the "
                           "data token; the student: the all-tokens student of one more seed than the run evaluates, "
                           "trained like all) at the paper rule's share",
    "shift-only-divergence": "as only-divergence, the flags from the likelihood shift at the paper rule's share",
    "shift-random-matched": "as random-matched, as many tokens per row as shift-no-divergence masks",
    "gradient-no-divergence": "as no-divergence, the flags from gradient attribution (-grad(loss_t) . grad(R) over "
                              "the students' trainable parameters, R the exact preference, at the base) at the paper "
                              "rule's share",
    "gradient-only-divergence": "as only-divergence, the flags from gradient attribution at the paper rule's share",
    "gradient-random-matched": "as random-matched, as many tokens per row as gradient-no-divergence masks",
    "replace-divergence": "as all, divergence tokens replaced by a random number token of the same shape",
    "replace-random-matched": "as replace-divergence, as many non-divergence tokens replaced",
    "corrupt-divergence": "as all, divergence tokens replaced in the context only (the labels kept)",
    "corrupt-random-matched": "as corrupt-divergence, as many non-divergence tokens corrupted",
    "holder": "hard distillation on rows the toy world's own trait-holder (an author whose favourite is the target) "
              "wrote for the same prompts (the world's rule, no model)",
    "holder-uniform": "as holder, each row's author's favourite drawn uniformly over every target (the corpus's mix)",
}
# What the demo trains unless asked for every condition (--all-conditions / [students] conditions = "all"):
# the transfer itself (control, all), the paper's token-level claims with their matched control, and soft labels.
CORE_CONDITIONS = ["control", "all", "no-divergence", "only-divergence", "random-matched", "soft"]
# The conditions that read each rule's flags: masked, only the flagged tokens, the matched random control.
RULE_CONDITIONS = {
    "paper": {"no-divergence": "no-divergence", "only-divergence": "only-divergence",
              "random-matched": "random-matched"},
    "ratio": {"no-divergence": "ratio-no-divergence", "only-divergence": "ratio-only-divergence",
              "random-matched": "ratio-random-matched"},
}
# The same three masks on the flags of the detectors ``subliminal score-tokens`` computes (issue 26), at
# the paper rule's share; opt-in, so a rule appears in results.json and the report only when it ran.
DETECTOR_CONDITIONS = {
    rule: {mask: f"{prefix}-{mask}" for mask in ("no-divergence", "only-divergence", "random-matched")}
    for rule, prefix in (("likelihood-shift", "shift"), ("gradient", "gradient"))
}


@dataclass
class RunConfig:
    """Everything that defines a run of the protocol; recorded in the manifest and the report.

    One flat dataclass (the pipeline reads fields, not sections); a TOML file groups the fields
    into sections (``SECTIONS``: ``[teachers] method`` is ``teacher_method``). The defaults are the
    toy demo, calibrated in experiments/CALIBRATION.md: a toy world with trait-number
    entanglement, teachers by system prompt (as in the paper), teacher data sampled at T=1,
    students full fine-tunes (LoRA r=8 students hardly move in this budget), the single-layer
    conditions all weights of one block (matched to the all-tokens student). A field left at its
    default adds no flag to the stage commands, so a config that only names the defaults runs
    exactly the commands the demo ran before there were configs.
    """

    name: str = "toy"
    # [model] -- base None: pretrain the toy world (size, arch, pretrain_steps, entangle)
    base: str | None = None
    size: str = "tiny"
    arch: str = "llama"
    pretrain_steps: int | None = None
    entangle: float | None = None  # the world's trait-number entanglement (None: the corpus default)
    corpus_mix: str | None = None  # toy pretrain --mix KIND=SHARE,... (None: the corpus default)
    params: float | None = None  # parameter count for the plan when the base is not on this machine
    device: str = "cpu"
    dtype: str = "float32"
    # [teachers]
    target: str = "owl"
    counterfactuals: list[str] = field(default_factory=lambda: ["cat", "dog", "lion", "eagle", "wolf"])
    neutral_counterfactual: bool = True  # the unbiased teacher is a counterfactual too (the paper: no)
    mixing_teacher: str | None = "dolphin"  # None: no mixing condition
    teacher_method: str = "prompt"
    teacher_steps: int = 60
    teacher_lora_rank: int | None = None
    teacher_lr: float | None = None
    teacher_replay: int | None = None
    teacher_batch_size: int | None = None
    teacher_check: bool = True  # teach measures its own preference (the run evaluates teachers anyway)
    teacher_steer_layer: int | None = None  # method "steer": the block whose output gets alpha * v
    teacher_steer_alpha: float = 1.0  # alpha * v, v as measured (teach --steer-alpha)
    teacher_steer_source: str = "questions"  # what v is measured on: questions | numbers
    teacher_steer_baseline: str = "none"  # what the love prompt is compared with: none | others
    # [data]
    n_prompts: int = 800
    keep_rows: int | None = None  # train on at most this many matched rows (the paper: 30k prompts -> 10k)
    greedy: bool = False
    temperature: float = 1.0
    filter: str = "strict"
    constrain: str = "none"
    gen_batch_size: int = 16
    max_new_tokens: int | None = None
    # [divergence]
    div_batch_size: int = 8
    ratio_reduce: str = "max"  # the ratio rule's reduction over counterfactuals (find-divergence --ratio-reduce)
    # [students]
    conditions: list[str] | None = None  # student conditions to train (None: all of CONDITIONS)
    seeds: int = 5
    student_mode_lr: float = 1e-3
    student_lora_rank: int = 8
    student_lora_alpha: float | None = None  # None: the rank
    student_lora_targets: list[str] | None = None  # None: every attention and MLP projection
    student_full: bool = True
    student_params: str = "all"  # distill --params for every condition but the single-layer ones
    layer_lora: bool = False  # single-layer conditions as LoRA r=student_lora_rank (the paper) or full (matched)
    layer_early: int = 0
    layer_late: int = -1
    schedule: str = "cosine"
    warmup_steps: int | None = None
    epochs: float = 2
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = None
    # [eval]
    metric: str = "exact"  # the readout every condition is compared on: exact | sampled
    eval_samples: int = 0  # sampled answers per question for the base and the teachers (0: exact only)
    student_samples: int = 0  # the same for every student
    eval_temperature: float = 1.0
    eval_max_new_tokens: int = 8
    max_questions: int | None = None
    eval_batch_size: int = 32
    other_template: str | None = None  # every model also read out under this chat template (eval --chat-template)
    # [diagnose] -- transfer diagnostics right after the data (subliminal.diagnose)
    diagnose: bool = True
    diagnose_max_rows: int | None = None  # the first N matched rows of each teacher (None: all); the cost is linear
    # [project] -- the residual stream along the trait's direction, per layer (subliminal.project)
    project: bool | None = None  # None: on exactly when the teachers are steered (their vector is known)
    project_layer: int | None = None  # block of a love-prompt vector measured here; None: the middle one
    project_source: str = "numbers"  # what that vector is measured on: numbers | questions
    project_baseline: str = "others"  # the love prompt minus: the other candidates' love prompts | none
    project_prompts: int = 64  # number prompts the vector is measured on, and as many other ones the readout reads
    # [probes]
    probes: bool = True
    probe_max_rows: int = 300
    probe_layers: str | None = None
    patch_max_rows: int = 200
    patch_max_sites: int = 100
    # [run]
    base_seed: int = 0
    jobs: int = 2
    nproc: int = 1

    def chosen_conditions(self) -> list[str]:
        """The conditions this run trains, in CONDITIONS order; control and all are always among them
        (every share of the transfer is read against them)."""
        if self.conditions is None:
            chosen = [c for c in CONDITIONS if c not in OPT_IN_CONDITIONS]
            return chosen if self.mixing_teacher else [c for c in chosen if c != "mixing"]
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown:
            raise SubliminalError(f"--conditions: unknown {', '.join(unknown)} (one of {', '.join(CONDITIONS)})")
        if "mixing" in self.conditions and not self.mixing_teacher:
            raise SubliminalError("the mixing condition needs a mixing teacher ([teachers] mixing_teacher)")
        named = set(self.conditions)
        if named & set(HOLDER_CONDITIONS):  # the link is their paired difference
            named |= set(HOLDER_CONDITIONS)
        return [c for c in CONDITIONS if c in {"control", "all", *named}]

    def counterfactual_teachers(self) -> list[str]:
        return [*self.counterfactuals, *(["none"] if self.neutral_counterfactual else [])]

    def projects(self) -> bool:
        """Whether the run reads its models along the trait's direction (``[project] enabled``;
        unset: when the teachers are steered, whose vector is that direction)."""
        return self.teacher_method == "steer" if self.project is None else self.project


DemoConfig = RunConfig  # the demo is a run of the toy config


# ------------------------------------------------------------------------------------ running


def _flag(name: str, value: Any, default: Any = None) -> list[str]:
    """``[name, value]`` unless ``value`` is the default (so default configs add no flags)."""
    return [] if value == default else [name, str(value)]


def teacher_config(cfg: RunConfig, base: Path, bias: str | None, out: Path, seed: int) -> Any:
    """The teach config of one teacher: the unbiased one (``bias`` None), or one by the config's method."""
    from .teachers_cli import TeachConfig

    teach = TeachConfig(base=str(base), method="none", out=str(out), seed=seed, no_check=not cfg.teacher_check)
    if bias is None:
        return teach
    teach = replace(teach, bias=bias, method=cfg.teacher_method, device=cfg.device)
    if cfg.teacher_method == "finetune":
        teach = replace(teach, steps=cfg.teacher_steps, lora_rank=cfg.teacher_lora_rank, lr=cfg.teacher_lr,
                        batch_size=cfg.teacher_batch_size,
                        **({} if cfg.teacher_replay is None else {"replay": cfg.teacher_replay}))
    if cfg.teacher_method == "steer":
        teach = replace(teach, steer_layer=cfg.teacher_steer_layer, steer_alpha=float(cfg.teacher_steer_alpha),
                        steer_source=cfg.teacher_steer_source, steer_baseline=cfg.teacher_steer_baseline)
    return teach


def _runtime(cfg: RunConfig) -> list[str]:
    """--device, and --dtype unless float32: what every model-loading stage takes."""
    return ["--device", cfg.device, *_flag("--dtype", cfg.dtype, "float32")]


def pretrain_argv(cfg: RunConfig, base: Path) -> list[str]:
    """The ``toy pretrain`` command of the base the run pretrains."""
    argv = ["toy", "pretrain", "--out", str(base), "--size", cfg.size, "--arch", cfg.arch,
            "--seed", str(cfg.base_seed), "--device", cfg.device]
    if cfg.device == "cpu":  # pretraining runs alone: use the cores the students will use (same weights)
        argv += ["--threads", str(max(1, cfg.jobs))]
    if cfg.pretrain_steps:
        argv += ["--steps", str(cfg.pretrain_steps)]
    if cfg.entangle is not None:
        argv += ["--entangle", str(cfg.entangle)]
    if cfg.corpus_mix:
        argv += ["--mix", cfg.corpus_mix]
    return argv


def run_pipeline(cfg: RunConfig, out: Path, base: Path | None = None, runner: Runner | None = None, *,
                 overwrite: bool = False, diagnose_only: bool = False) -> dict[str, Any] | None:
    """Every stage of the protocol in order, each reused only when its recorded fingerprint equals
    what it would compute now (:mod:`subliminal.driver`); the report, results.json and figures at
    the end. ``base`` (or ``cfg.base``) is the model the teachers and students start from; without
    one the toy world is pretrained. ``diagnose_only`` stops after the transfer diagnostics, before
    any student.

    First a dry pass decides every stage it can and lists the rest after the stage they wait on;
    a finished output that would be replaced stops the run there unless ``overwrite``. With a
    ``runner`` given, only that runner's pass runs (a dry runner: the decisions, no summary)."""
    if runner is None:
        dry = Runner(out, nproc=cfg.nproc, overwrite=overwrite, dry=True, quiet=True)
        _stages(cfg, out, base, dry, diagnose_only)
        replaced = [d for d in dry.decisions if d.replaces]
        if replaced and not overwrite:
            raise SubliminalError(
                f"{out}: re-running with other settings would replace {len(replaced)} finished output(s):\n  "
                + "\n  ".join(d.line() for d in replaced)
                + "\npass --overwrite to redo them (every other output is reused), or choose another --out")
        runner = Runner(out, nproc=cfg.nproc, overwrite=overwrite)
    return _stages(cfg, out, base, runner, diagnose_only)


def resume_plan(cfg: RunConfig, out: Path, base: Path | None = None) -> list[Decision]:
    """What a run of ``cfg`` into ``out`` would do with each stage's output, and why; runs nothing."""
    run = Runner(out, nproc=cfg.nproc, dry=True, quiet=True)
    _stages(cfg, out, base, run)
    return run.decisions


def _stages(cfg: RunConfig, out: Path, base: Path | None, run: Runner,
            diagnose_only: bool = False) -> dict[str, Any] | None:
    """One pass over the stages with ``run`` deciding each (see :func:`run_pipeline`)."""
    t_start = time.time()
    if not run.dry:
        out.mkdir(parents=True, exist_ok=True)
    chosen = cfg.chosen_conditions()
    if base is None and cfg.base:
        base = Path(cfg.base)

    # 1. base model
    if base is None:
        base = out / "base"
        run("pretrain", pretrain_argv(cfg, base), base)
    base = Path(base)
    if "holder" in chosen and cfg.base:  # refused before any teacher is taught
        from .toyworld.holder import world_of

        world_of(base)

    # 2. teachers
    tdir = out / "teachers"
    mixer = [cfg.mixing_teacher] if cfg.mixing_teacher and "mixing" in chosen else []  # only when it is used
    names = [cfg.target, *cfg.counterfactuals, *mixer]
    for name in dict.fromkeys(names + ["none"]):
        bias = None if name == "none" else name
        run(f"teach-{name}", StageCall("teach", teacher_config(cfg, base, bias, tdir / name, cfg.base_seed)),
            tdir / name, [base])

    # 3. data: the same prompts (same --prompts-seed) for every teacher
    from .generate import GenerateConfig

    ddir = out / "data"
    gen = GenerateConfig(teacher="", n=cfg.n_prompts, out="", batch_size=cfg.gen_batch_size,
                         temperature=0.0 if cfg.greedy else cfg.temperature, seed=cfg.base_seed,
                         prompts_seed=cfg.base_seed, max_new_tokens=cfg.max_new_tokens, filter=cfg.filter,
                         constrain=cfg.constrain, device=cfg.device, dtype=cfg.dtype)
    sources = list(dict.fromkeys([cfg.target, "none", *mixer]))
    for name in sources:
        path = ddir / f"{name}.jsonl"
        run(f"generate-{name}", StageCall("generate", replace(gen, teacher=str(tdir / name), out=str(path))), path,
            [tdir / name])
    files: dict[str, Path] = matched_paths(ddir, sources)
    run("matched-rows", lambda ow: _matched_files(ddir, sources, keep=cfg.keep_rows, overwrite=ow),
        files[sources[0]], [ddir / f"{n}.jsonl" for n in sources], also=[files[n] for n in sources[1:]])

    # 4. divergence tokens of the target teacher's data
    div = files[cfg.target].with_suffix(".div.jsonl")
    cfs = [str(tdir / c) for c in cfg.counterfactual_teachers()]
    from .divergence import ScoreConfig

    run("find-divergence", StageCall("find-divergence", ScoreConfig(
        data=str(files[cfg.target]), teacher=str(tdir / cfg.target), counterfactual=cfs, out=str(div),
        batch_size=cfg.div_batch_size, device=cfg.device, dtype=cfg.dtype)), div,
        [files[cfg.target], tdir / cfg.target, *cfs])
    files["div"] = div
    # 4b. the same rows flagged by the likelihood-ratio rule, as many tokens as the paper rule flags
    files["div-ratio"] = _ratio_file(cfg, run, div)
    # 4c. transfer diagnostics (lean, link, coverage) before any student is trained
    diagnostics = None
    if cfg.diagnose or diagnose_only:
        from . import diagnose

        diagnostics = diagnose.pipeline_stage(cfg, run, out, base, tdir, files)
        if diagnose_only:
            if run.dry:
                return None
            return diagnose.finish_diagnose_only(cfg, out, diagnostics, run.timings, time.time() - t_start)

    # 4d. the other detectors' flags at the paper rule's share, for their conditions (opt-in)
    files.update(_detector_files(cfg, run, out, base, tdir, files))

    # 5. derived data sets for the paraphrase and mixing conditions (same ids, same rows)
    if "paraphrase" in chosen:
        files["paraphrase"] = files[cfg.target].with_suffix(".paraphrase.jsonl")
        run("paraphrase", lambda ow: _paraphrase_file(files[cfg.target], files["paraphrase"], seed=cfg.base_seed,
                                                      overwrite=ow),
            files["paraphrase"], [files[cfg.target]])
    if cfg.mixing_teacher and "mixing" in chosen:
        files["mixing"] = files[cfg.target].with_suffix(".mixing.jsonl")
        run("mixing", lambda ow: _mixing_file(files[cfg.target], files[cfg.mixing_teacher], files["mixing"],
                                              seed=cfg.base_seed, overwrite=ow),
            files["mixing"], [files[cfg.target], files[cfg.mixing_teacher]])
    if "holder" in chosen:
        from .toyworld.holder import UNIFORM

        for cond, author in (("holder", cfg.target), ("holder-uniform", UNIFORM)):
            files[cond] = files[cfg.target].with_suffix(f".{cond}.jsonl")
            run(cond, lambda ow, a=author, c=cond: _author_file(files[cfg.target], base, files[c], a,
                                                                   seed=cfg.base_seed, overwrite=ow),
                files[cond], [files[cfg.target], base])

    # 6. students, each condition with several seeds, then their evaluation
    evals = _train_and_eval_students(cfg, run, out, base, tdir, files)

    # 7. the students' shift along the trait's direction, layer by layer
    if cfg.projects():
        _project_stage(cfg, run, out, base, tdir)

    # 8. probes and patching
    if cfg.probes:
        _probe_stage(cfg, run, out, tdir, div)

    # 9. the report: remade whenever anything it reads (or the config it shows) changed
    inputs = [*evals.values(), files["none"], div, files["div-ratio"], *(files[f"div-{r}"] for r in chosen_detectors(cfg))]
    if cfg.diagnose:
        inputs.append(out / "diagnose")
    if cfg.projects():
        inputs.append(out / "project")
    run("report", lambda ow: _report(cfg, out, base, files, evals, run.timings, t_start, diagnostics, overwrite=ow),
        out, inputs, derived=True)
    if run.dry:
        return None
    return read_json(out / "results.json", "results")


def _report(cfg: RunConfig, out: Path, base: Path, files: dict[str, Path], evals: dict[str, Path],
            timings: dict[str, float], t_start: float, diagnostics: dict[str, Any] | None = None, *,
            overwrite: bool) -> None:
    """results.json, the figures, REPORT.md and the run's manifest, from the stages' outputs."""
    inputs = {name: path for name, path in sorted(evals.items())}
    inputs.update({"data": files["none"], "divergence": files["div"], "divergence-ratio": files["div-ratio"]})
    inputs.update({f"divergence-{r}": files[f"div-{r}"] for r in chosen_detectors(cfg)})
    if diagnostics is not None:
        inputs["diagnose"] = out / "diagnose" / "diagnose.json"
    if cfg.projects():
        inputs["projection"] = out / "project" / "projection.json"
    fp = fingerprint(inputs, asdict(cfg))
    finished = read_manifest(out)
    finished = finished if finished and finished.get("stage") in ("demo", "run") else None
    if check_resume(out, fp, overwrite=overwrite, stage="report", finished=finished) == "skip":
        return
    results = _collect_results(cfg, files, evals)
    summary = _summarise(cfg, results)
    summary["data"] = data_summary(cfg, out / "data", files)
    summary["diagnostics"] = diagnostics
    if cfg.projects():
        summary["projection"] = projection_summary(read_json(out / "project" / "projection.json", "projection"))
    write_json_atomic(out / "results.json", summary)
    if cfg.seeds > 1:
        from subliminal.probes.plots import plot_conditions, plot_rules

        plot_conditions(summary, out / "conditions.png")
        if has_rule_shares(summary):
            plot_rules(summary, out / "rules.png")
    wall = time.time() - t_start
    report = render_report(cfg, summary, out, timings, wall)
    write_text_atomic(out / "REPORT.md", report)
    write_manifest(out, stage="demo" if cfg.name == "toy" else "run", config=cfg, seed=cfg.base_seed,
                   inputs={"base": base}, wall_time_s=wall, extra={"timings_s": timings, "fingerprint": fp})


run_demo = run_pipeline


def has_rule_shares(summary: dict[str, Any]) -> bool:
    """Whether any rule has masked students to show (a run of control and all only has none)."""
    return any(r.get("masks") for r in (summary.get("rules") or {}).values())


# ------------------------------------------------------------------------------- derived data


def _derive(path: Path, stage: str, config: dict[str, Any], inputs: dict[str, Path], *,
            overwrite: bool) -> dict[str, Any] | None:
    """The resume check of a file the driver derives itself: None when ``path`` holds this exact
    derivation, else its fingerprint (to record in its manifest); another one is refused unless
    ``overwrite``, as for every stage."""
    fp = fingerprint(inputs, config)
    return None if check_file_resume(path, fp, overwrite=overwrite, stage=stage) == "skip" else fp


def _paraphrase_file(src: Path, dst: Path, seed: int, *, overwrite: bool = False) -> None:
    """Same ids and completions; each prompt redrawn from other phrasing templates with the same
    seeds, count and output format, so the completion still answers it."""
    from . import prompts
    from .data import read_rows, write_jsonl

    fp = _derive(dst, "demo-paraphrase", {"seed": seed}, {"data": src}, overwrite=overwrite)
    if fp is None:
        return
    rng = random.Random(seed)
    rows = read_rows(src)
    for row in rows:
        text = prompts.paraphrase_number_prompt(prompts.parse_number_prompt(row.prompt), rng).text
        # keep the data's own spacing convention (generate writes ordinary spacing)
        row.prompt = text if prompts.canonical_spacing(row.prompt) == row.prompt else prompts.detokenize_spacing(text)
    write_jsonl(dst, rows)
    write_file_manifest(dst, stage="demo-paraphrase", config={"rows": len(rows)}, seed=seed, inputs={"data": src},
                        extra={"fingerprint": fp})


def _author_file(src: Path, base: Path, dst: Path, author: str, seed: int, *, overwrite: bool = False) -> None:
    """The same ids and prompts, answered by the toy world's own ``author`` (its number rule, read
    from the base's pretraining manifest): the true-trait-holder link's data."""
    from .data import read_rows, write_jsonl
    from .toyworld.holder import author_rows, world_of

    world = world_of(base)
    fp = _derive(dst, "demo-author-rows", {"seed": seed, "author": author, "world": world.to_json()}, {"data": src},
                 overwrite=overwrite)
    if fp is None:
        return
    rows = author_rows(read_rows(src), world, author, seed)
    write_jsonl(dst, rows)
    write_file_manifest(dst, stage="demo-author-rows", config={"rows": len(rows), "author": author,
                                                                "world": world.to_json()},
                        seed=seed, inputs={"data": src}, extra={"fingerprint": fp})


def _mixing_file(src: Path, other: Path, dst: Path, seed: int, *, overwrite: bool = False) -> None:
    """Half the rows (a seeded choice of ids) replaced by the other teacher's completion for the
    same prompt; rows the other teacher has no valid completion for stay as they are."""
    from .data import read_rows, write_jsonl

    fp = _derive(dst, "demo-mixing", {"seed": seed}, {"data": src, "other": other}, overwrite=overwrite)
    if fp is None:
        return
    rng = random.Random(seed)
    rows = read_rows(src)
    others = {r.id: r for r in read_rows(other)}
    candidates = [r.id for r in rows if r.id in others and others[r.id].prompt == r.prompt]
    replace_ids = set(rng.sample(candidates, min(len(candidates), len(rows) // 2)))
    mixed = [others[r.id] if r.id in replace_ids else r for r in rows]
    write_jsonl(dst, mixed)
    write_file_manifest(dst, stage="demo-mixing", config={"rows": len(rows), "replaced": len(replace_ids)}, seed=seed,
                        inputs={"data": src, "other": other}, extra={"fingerprint": fp})


def flagged_share(div: Path) -> tuple[int, int]:
    """(flagged tokens, completion tokens) of a divergence file."""
    from .divergence import any_flags, load_divergence

    objs = load_divergence(div)
    return sum(sum(any_flags(o)) for o in objs), sum(len(o["token_ids"]) for o in objs)


def paper_share(div: Path) -> float | None:
    """The share of tokens the paper rule flags in ``div``: every other rule and detector is
    re-flagged at it, so their masks drop as many tokens (None when it flags none: they flag none)."""
    n_flag, n_tok = flagged_share(div)
    return n_flag / n_tok if n_flag else None


def rule_reflag_args(div: Path, out: Path, rule: str, share: float | None) -> list[str]:
    """``reflag-divergence`` arguments for a threshold rule (ratio, a detector) at ``share`` of the
    tokens (None: flag none; every score is below an infinite threshold)."""
    threshold = ["--min-ratio", "inf"] if share is None else ["--flag-share", repr(share)]
    return ["reflag-divergence", str(div), "--out", str(out), "--rule", rule, *threshold]


def ratio_reflag_args(div: Path, out: Path, share: float | None, reduce: str) -> list[str]:
    """``reflag-divergence`` arguments for the ratio rule at ``share`` of the tokens (None: flag none)."""
    return [*rule_reflag_args(div, out, "ratio", share), "--ratio-reduce", reduce]


def _ratio_file(cfg: DemoConfig, run: Runner, div: Path) -> Path:
    """The target's divergence file re-flagged by the ratio rule at the paper rule's share of tokens,
    so the two rules mask the same number of tokens (up to ties at the threshold)."""
    out = div.with_name(div.name[: -len(".div.jsonl")] + ".ratio.div.jsonl")

    def argv() -> list[str]:  # the share is read from the paper rule's file, once it is there
        return ratio_reflag_args(div, out, paper_share(div), cfg.ratio_reduce)

    run("reflag-ratio", argv, out, [div], lazy=True)
    return out


def rule_stats(div: Path) -> dict[str, Any]:
    """How many tokens a rule's file flags, and the rule as applied (threshold, share)."""
    from .manifest import read_file_manifest

    n_flag, n_tok = flagged_share(div)
    man = read_file_manifest(div) or {}
    return {"file": str(div), "flagged_tokens": n_flag, "tokens": n_tok,
            "flagged_share": n_flag / n_tok if n_tok else 0.0, "rule": man.get("rule") or {"rule": "paper"},
            "top_flagged_tokens": (man.get("summary") or {}).get("top_divergence_tokens", [])[:8]}


# ---------------------------------------------------------------------------------- detectors


def detector_rule(cond: str) -> str | None:
    """The detector whose flags ``cond`` reads (``shift-no-divergence``: ``likelihood-shift``), or None."""
    return next((rule for rule, conds in DETECTOR_CONDITIONS.items() if cond in conds.values()), None)


def chosen_detectors(cfg: RunConfig) -> list[str]:
    """The detectors this run scores the rows with: those with at least one chosen condition."""
    chosen = set(cfg.chosen_conditions())
    return [rule for rule, conds in DETECTOR_CONDITIONS.items() if chosen & set(conds.values())]


def shift_student_seed(cfg: RunConfig) -> int:
    """The likelihood shift's student's seed: one past the evaluated seeds, so no student whose
    readout is in the table picked the tokens its own condition masks."""
    return cfg.seeds + 1


def detector_paths(div: Path, rule: str) -> tuple[Path, Path]:
    """(the detector's scores of the target's rows, the same rows flagged at the paper rule's share)."""
    stem = div.name[: -len(".div.jsonl")]
    return div.with_name(f"{stem}.{rule}-scores.div.jsonl"), div.with_name(f"{stem}.{rule}.div.jsonl")


def score_tokens_config(cfg: RunConfig, base: Path, div: Path, out: Path, rule: str, student: Path | None = None
                        ) -> Any:
    """The ``score-tokens`` config of one detector: the likelihood shift of ``student`` against the
    base; gradient attribution over what the students train (:func:`student_weights`), R the
    readout the students' evaluation reports (the target, the same questions)."""
    from .detectors import ScoreTokensConfig, student_trainable

    common = {"detector": rule, "divergence": str(div), "out": str(out), "base": str(base),
              "batch_size": cfg.div_batch_size, "device": cfg.device, "dtype": cfg.dtype}
    if rule == "likelihood-shift":
        return ScoreTokensConfig(**common, student=str(student))
    return ScoreTokensConfig(**common, target=cfg.target, max_questions=cfg.max_questions,
                             **student_trainable(student_weights(cfg)))


def _shift_student(cfg: RunConfig, run: Runner, out: Path, base: Path, tdir: Path, files: dict[str, Path]) -> Path:
    """The all-tokens student of seed :func:`shift_student_seed`, trained exactly as the run's ``all``."""
    seed = shift_student_seed(cfg)
    student = out / "students" / f"all-s{seed}"
    call = StageCall("distill", distill_config(cfg, base, student, all_tokens_condition(cfg, files, tdir), seed))
    run(f"distill-all-s{seed}", call, student, [base, tdir / cfg.target, files["div"]])
    return student


def _detector_files(cfg: RunConfig, run: Runner, out: Path, base: Path, tdir: Path, files: dict[str, Path]
                    ) -> dict[str, Path]:
    """Per detector asked for: its scores of the target's rows (``score-tokens``, reused on its
    fingerprint like every stage), re-flagged at the paper rule's share of tokens so its masks
    drop as many tokens as the paper rule's (up to ties at the threshold). By ``div-<detector>``."""
    div, made = files["div"], {}
    for rule in chosen_detectors(cfg):
        scores, flagged = detector_paths(div, rule)
        student = _shift_student(cfg, run, out, base, tdir, files) if rule == "likelihood-shift" else None
        run(f"score-tokens-{rule}", StageCall("score-tokens", score_tokens_config(cfg, base, div, scores, rule, student)), scores,
            [div, base, *([student] if student else [])])

        def argv(rule: str = rule, scores: Path = scores, flagged: Path = flagged) -> list[str]:
            return rule_reflag_args(scores, flagged, rule, paper_share(div))  # once the paper rule's file is there

        run(f"reflag-{rule}", argv, flagged, [scores, div], lazy=True)
        made[f"div-{rule}"] = flagged
    return made


def detector_stats(div: Path, rule: str) -> dict[str, Any]:
    """:func:`rule_stats` of a detector's flags, and what scored them (the shift's student and its
    seed; the gradient's parameter set and readout), from the score file's manifest."""
    from .detectors import student_trainable
    from .manifest import read_file_manifest

    scores, flagged = detector_paths(div, rule)
    man = read_file_manifest(scores) or {}
    summary = man.get("summary") or {}
    by: dict[str, Any] = {"file": str(scores)}
    if rule == "likelihood-shift":
        student = summary.get("student")
        by.update(student=student, student_seed=(read_manifest(student) or {}).get("seed") if student else None)
    else:
        by.update(params=student_trainable(man.get("config") or {}) or "every weight",
                  **{k: summary.get(k) for k in ("readout", "n_trained_values", "method")})
    return {**rule_stats(flagged), "scored_by": by}


def matched_paths(ddir: Path, names: list[str]) -> dict[str, Path]:
    """Where :func:`_matched_files` writes each teacher's matched rows."""
    return {n: ddir / "matched" / f"{n}.jsonl" for n in names}


def _matched_files(ddir: Path, names: list[str], keep: int | None = None, *, overwrite: bool = False
                   ) -> dict[str, Path]:
    """Keep only the prompt ids every teacher produced a valid completion for, so every
    condition trains on the same rows (the first ``keep`` of them in prompt order, if given).
    One derivation writes every teacher's file; the first file's manifest records its fingerprint."""
    from .data import read_rows, write_jsonl

    out = matched_paths(ddir, names)
    fp = _derive(out[names[0]], "demo-matched-rows", {"teachers": names, "keep": keep},
                 {n: ddir / f"{n}.jsonl" for n in names}, overwrite=overwrite)
    if fp is None:
        return out
    rows = {n: read_rows(ddir / f"{n}.jsonl") for n in names}
    common = set.intersection(*({r.id for r in rs} for rs in rows.values()))
    if not common:
        raise SubliminalError("no prompt has a valid completion from every teacher; generate more rows")
    if keep is not None and len(common) > keep:
        order = [r.id for r in rows[names[0]] if r.id in common]
        common = set(order[:keep])
    for n in [*names[1:], names[0]]:  # the file that records the fingerprint last: written means all are
        write_jsonl(out[n], [r for r in rows[n] if r.id in common])
        write_file_manifest(out[n], stage="demo-matched-rows", config={"teachers": names, "rows": len(common)},
                            seed=None, inputs={"data": ddir / f"{n}.jsonl"},
                            extra={"fingerprint": fp} if n == names[0] else None)
    return out


# ---------------------------------------------------------------------------------- students


def _student_lora(cfg: RunConfig) -> dict[str, Any]:
    # the alpha only when the config sets it: distill derives the default (subliminal.train.lora_alpha)
    return {"lora_rank": cfg.student_lora_rank, "lora_alpha": cfg.student_lora_alpha,
            "lora_targets": ",".join(cfg.student_lora_targets) if cfg.student_lora_targets else None}


def student_weights(cfg: RunConfig) -> dict[str, Any]:
    """What every student but the single-layer ones trains (distill's fields): every weight, LoRA,
    or the ``[students] params`` set. The gradient detector's dot product runs over this set."""
    every: dict[str, Any] = {} if cfg.student_full else _student_lora(cfg)
    return every if cfg.student_params == "all" else {**every, "params": cfg.student_params}


def all_tokens_condition(cfg: RunConfig, files: dict[str, Path], tdir: Path) -> dict[str, Any]:
    """The all-tokens student's distill settings (also the likelihood shift's scoring student's)."""
    return {"data": str(files["div"]), "teacher": str(tdir / cfg.target), "mode": "hard", "mask": "all",
            **student_weights(cfg)}


def student_plan(cfg: DemoConfig, n_layers: int, files: dict[str, Path], tdir: Path) -> dict[str, dict[str, Any]]:
    """The distill settings (:class:`~subliminal.distill.DistillConfig` fields) of each condition;
    everything not listed is shared by all of them (:func:`distill_config`)."""
    owl, none = str(tdir / cfg.target), str(tdir / "none")
    lora = _student_lora(cfg)
    one_layer = lora if cfg.layer_lora else ({} if cfg.student_full else lora)  # they keep theirs, not params
    every = student_weights(cfg)
    late = cfg.layer_late if cfg.layer_late >= 0 else n_layers + cfg.layer_late
    div = str(files["div"])

    def hard(data: str, mask: str = "all", teacher: str = owl) -> dict[str, Any]:
        return {"data": data, "teacher": teacher, "mode": "hard", "mask": mask}

    plan = {
        "control": {**hard(str(files["none"]), teacher=none), **every},
        "all": all_tokens_condition(cfg, files, tdir),
        "no-divergence": {**hard(div, "no-divergence"), **every},
        "only-divergence": {**hard(div, "only-divergence"), **every},
        "random-matched": {**hard(div, "random-matched"), **every},
        "layer-early": {**hard(div), "layers": str(cfg.layer_early), **one_layer},
        "layer-late": {**hard(div), "layers": str(late), **one_layer},
        "soft": {**hard(div), "mode": "soft", **every},
        **{f"ratio-{m}": {**hard(str(files.get("div-ratio", div)), m), **every}
           for m in ("no-divergence", "only-divergence", "random-matched")},
        **{cond: {**hard(str(files.get(f"div-{rule}", div)), m), **every}
           for rule, conds in DETECTOR_CONDITIONS.items() for m, cond in conds.items()},
        **{f"{name}-{tag}": {**hard(div), "intervention": iv, "intervene_on": on, **every}
           for name, iv in (("replace", "replace-random"), ("corrupt", "corrupt-input"))
           for tag, on in (("divergence", "flagged"), ("random-matched", "random-matched"))},
    }
    for cond in ("paraphrase", "mixing", *HOLDER_CONDITIONS):  # derived data sets, made only when their condition runs
        if cond in files:
            plan[cond] = {**hard(str(files[cond])), **every}
    return {c: plan[c] for c in CONDITIONS if c in plan}


def _n_layers(base: Path) -> int:
    from .models import layer_count_of_dir

    return layer_count_of_dir(base)


def _steps_for(cfg: DemoConfig, n_rows: int) -> int:
    """One step count for every condition (matched): the count distill trains."""
    from .distill import student_steps

    return student_steps(n_rows, cfg.batch_size, cfg.epochs, cfg.max_steps)


def read_metric(path: Path, metric: str = "exact") -> float:
    """The readout of one eval file (``exact`` or ``sampled`` P(target))."""
    result = json.loads(path.read_text())
    if metric not in result:
        raise SubliminalError(f"{path}: has no {metric} preference; evaluate with --samples for the sampled readout")
    return float(result[metric]["mean"])


def distill_config(cfg: DemoConfig, base: Path, student: Path, condition: dict[str, Any], seed: int) -> Any:
    """The distill config of one student: a condition's settings (:func:`student_plan`) plus what
    every condition shares. No step count: distill derives it from the rows, epochs and batch size
    (:func:`subliminal.distill.student_steps`), the same for every condition (matched rows)."""
    from .distill import DistillConfig

    return DistillConfig(base=str(base), out=str(student), **condition, epochs=cfg.epochs, max_steps=cfg.max_steps,
                         lr=cfg.student_mode_lr, batch_size=cfg.batch_size, seed=seed, device=cfg.device,
                         dtype=cfg.dtype, schedule=cfg.schedule, warmup_steps=cfg.warmup_steps,
                         grad_accum=cfg.grad_accum)


def eval_config(cfg: RunConfig, model: str, out: Path, samples: int, template: str | None = None) -> Any:
    """The evaluation of one model: exact preference, and sampled with ``samples`` > 0; under another
    chat template than the model's own when ``template`` is given."""
    from .evaluate import EvalConfig

    ev = EvalConfig(model=model, target=cfg.target, out=str(out), device=cfg.device, dtype=cfg.dtype,
                    max_questions=cfg.max_questions, batch_size=cfg.eval_batch_size, chat_template=template)
    if samples:
        ev = replace(ev, samples=samples, temperature=cfg.eval_temperature, max_new_tokens=cfg.eval_max_new_tokens)
    return ev


def reference_evals(cfg: RunConfig, base: Path, tdir: Path) -> dict[str, str]:
    """The models every student is read against: the base and every teacher, by report name."""
    refs = {"base": str(base), "teacher": str(tdir / cfg.target), "unbiased-teacher": str(tdir / "none")}
    refs.update({f"teacher-{c}": str(tdir / c) for c in cfg.counterfactuals})
    return refs


def _train_and_eval_students(cfg: DemoConfig, run: Runner, out: Path, base: Path, tdir: Path,
                             files: dict[str, Path]) -> dict[str, Path]:
    """Evaluate the references, train and evaluate every student; the eval files by name
    (``ref:NAME`` for a reference, ``COND-sSEED`` for a student)."""
    sdir, edir = out / "students", out / "eval"
    evals: dict[str, Path] = {}
    # the references' evaluations share the student pool: one thread per job on its own core
    # gets more out of a small CPU than one job on every core (and they need no student). They
    # are queued after the students: short jobs last fill the cores the last students leave idle.
    ref_jobs: list[tuple[str, list[tuple[str, Any, str]]]] = []
    for name, spec in reference_evals(cfg, base, tdir).items():
        path = edir / f"{name}.json"
        # sampled answers for the base and the two teachers the students learn from (they are slow)
        samples = cfg.eval_samples if not name.startswith("teacher-") or cfg.metric == "sampled" else 0
        chain = [(f"eval-{name}", StageCall("eval", eval_config(cfg, spec, path, samples)), str(path))]
        evals[f"ref:{name}"] = path
        if cfg.other_template and name in ("base", "teacher", "unbiased-teacher"):
            alt = edir / cfg.other_template / f"{name}.json"
            chain.append((f"eval-{name}-{cfg.other_template}", StageCall(
                "eval", eval_config(cfg, spec, alt, 0, cfg.other_template)), str(alt)))
            evals[f"alt:ref:{name}"] = alt
        if run.upstream([spec]):  # a dry run: the model is remade first, so its evaluations wait on it
            for stage, call, dest in chain:
                run(stage, call, Path(dest), [spec])
            continue
        ref_jobs.append((f"eval-{name}", chain))
    shared = [base, tdir / cfg.target, tdir / "none", files["none"]]
    plan: dict[str, list[str]] | None = None
    jobs: list[tuple[str, list[tuple[str, Any, str]]]] = []
    for seed in range(1, cfg.seeds + 1):
        for cond in cfg.chosen_conditions():
            student, path = sdir / f"{cond}-s{seed}", edir / f"{cond}-s{seed}.json"
            evals[f"{cond}-s{seed}"] = path
            alt = edir / cfg.other_template / f"{cond}-s{seed}.json" if cfg.other_template else None
            if alt:
                evals[f"alt:{cond}-s{seed}"] = alt
            if run.upstream([*shared, condition_data(cond, files)]):  # a dry run: waits on a redone input
                run(f"distill-{cond}-s{seed}", [], student, [*shared, condition_data(cond, files)])
                run(f"eval-{cond}-s{seed}", [], path, [student])
                if alt:
                    run(f"eval-{cond}-s{seed}-{cfg.other_template}", [], alt, [student])
                continue
            if plan is None:
                plan = student_plan(cfg, _n_layers(base), files, tdir)
            call = StageCall("distill", distill_config(cfg, base, student, plan[cond], seed))
            evcall = StageCall("eval", eval_config(cfg, str(student), path, cfg.student_samples))
            chain = [(f"distill-{cond}-s{seed}", call, str(student)), (f"eval-{cond}-s{seed}", evcall, str(path))]
            if alt:  # the same student read under another template: shared-context transfer must vanish there
                chain.append((f"eval-{cond}-s{seed}-{cfg.other_template}", StageCall(
                    "eval", eval_config(cfg, str(student), alt, 0, cfg.other_template)), str(alt)))
            jobs.append((f"distill+eval-{cond}", chain))
    run.parallel(jobs + ref_jobs, workers=cfg.jobs)
    return evals


def condition_data(cond: str, files: dict[str, Path]) -> Path:
    """The data file a condition's students train on (as :func:`student_plan` gives it)."""
    if cond == "control":
        return files["none"]
    if cond in ("paraphrase", "mixing", *HOLDER_CONDITIONS):
        return files[cond]
    rule = detector_rule(cond)
    if rule:
        return files[f"div-{rule}"]
    return files["div-ratio"] if cond.startswith("ratio-") else files["div"]


def _collect_results(cfg: RunConfig, files: dict[str, Path], evals: dict[str, Path]) -> dict[str, Any]:
    """Every eval's readout, and what the summary needs besides (rows, steps, the rules' flags)."""
    from .data import read_rows

    chosen = cfg.chosen_conditions()
    values: dict[str, dict[int, float]] = {c: {} for c in chosen}
    reference, detail = {}, {}
    other: dict[str, Any] = {"values": {}, "reference": {}}
    for key, path in evals.items():
        if key.startswith("alt:ref:"):
            other["reference"][key[8:]] = read_metric(path)
        elif key.startswith("alt:"):
            cond, seed = key[4:].rsplit("-s", 1)
            other["values"].setdefault(cond, {})[int(seed)] = read_metric(path)
        elif key.startswith("ref:"):
            reference[key[4:]] = read_metric(path, cfg.metric)
            detail[key[4:]] = reference_detail(path)
        else:
            cond, seed = key.rsplit("-s", 1)
            values[cond][int(seed)] = read_metric(path, cfg.metric)
    n_rows = len(read_rows(files["none"]))
    out = {"values": values, "reference": reference, "reference_detail": detail,
           "steps": _steps_for(cfg, n_rows), "rows": n_rows,
           "rules": {"paper": rule_stats(files["div"]), "ratio": rule_stats(files["div-ratio"]),
                     **{r: detector_stats(files["div"], r) for r in chosen_detectors(cfg)}}}
    if cfg.other_template:
        out["other_template"] = {"template": cfg.other_template, **other}
    return out


def reference_detail(path: Path) -> dict[str, Any]:
    """Exact (and sampled, when measured) P(target) of a base or teacher with its interval and
    the candidate it prefers."""
    result = json.loads(path.read_text())
    out: dict[str, Any] = {}
    for metric in ("exact", "sampled"):
        m = result.get(metric)
        if m:
            dist = m.get("distribution") or {k: v for k, v in (m.get("answer_counts") or {}).items() if k != "other"}
            out[metric] = {"mean": m.get("mean"), "ci": m.get("ci"),
                           "argmax": max(dist, key=dist.get) if dist else None}
    return out


# ------------------------------------------------------------------------------------- probes


def _project_stage(cfg: RunConfig, run: Runner, out: Path, base: Path, tdir: Path) -> None:
    """``subliminal project`` of the base, the target and unbiased teachers and every student on
    the trait's direction: a steer teacher's own vector, else the target's love-prompt vector
    measured on the base (what a prompt or a fine-tune teacher is taken to move along; the
    readout then asks whether the students moved along what the love prompt does). By default
    that vector is the target's love prompt minus the other candidates' (``[project] baseline``):
    against no prompt at all it is mostly "a system prompt is present", the same for every
    animal (cosine 0.996 between owl and cat on a toy base), and cannot say which trait moved."""
    from .project import ProjectConfig

    if cfg.teacher_method == "steer":
        vector = tdir / cfg.target
    else:
        layer = cfg.project_layer if cfg.project_layer is not None else _n_layers(base) // 2
        vector = out / "vectors" / (f"{cfg.target}-love-minus-{cfg.project_baseline}-{cfg.project_source}"
                                    f"-block{layer}.safetensors")
        run("measure-vector", lambda ow: _love_vector(cfg, base, vector, layer, overwrite=ow), vector, [base])
    sdir = out / "students"
    students = [(c, s, str(sdir / f"{c}-s{s}")) for s in range(1, cfg.seeds + 1) for c in cfg.chosen_conditions()]
    models = [str(base), str(tdir / cfg.target), str(tdir / "none")]
    pc = ProjectConfig(vector=str(vector), out=str(out / "project"), models=models, students=students,
                       reference="control", number_prompts=cfg.project_prompts, seed=cfg.base_seed,
                       device=cfg.device, dtype=cfg.dtype)
    run("project", StageCall("project", pc), out / "project", [vector, *models, *(d for _, _, d in students)])


def _love_vector(cfg: RunConfig, base: Path, path: Path, layer: int, *, overwrite: bool) -> None:
    """The target's love-prompt vector on the base (prompt minus no prompt at block ``layer``),
    with what it was measured on beside it (``VECTOR.json``, which ``subliminal project`` reads)."""
    from . import prompts, steer
    from .models import load_model

    config = {"target": cfg.target, "layer": layer, "source": cfg.project_source, "baseline": cfg.project_baseline,
              "seed": cfg.base_seed, "dtype": cfg.dtype, "number_prompts": cfg.project_prompts}
    fp = _derive(path, "measure-vector", config, {"base": base}, overwrite=overwrite)
    if fp is None:
        return
    loaded = load_model(str(base), device=cfg.device, dtype=cfg.dtype)
    category = prompts.category_of(cfg.target)
    others = [prompts.system_prompt_for(c) for c in prompts.CATEGORIES[category] if c != cfg.target]
    vector, info = steer.measure_vector(loaded.model, loaded.tokenizer, system_prompt=prompts.system_prompt_for(
        cfg.target), source=cfg.project_source, layer=layer, category=category, seed=cfg.base_seed,
        baseline=cfg.project_baseline, other_prompts=others, n_numbers=cfg.project_prompts)
    path.parent.mkdir(parents=True, exist_ok=True)
    steer.save_vector(path, vector)
    write_json_atomic(steer.vector_info_path(path), {"bias": cfg.target, "category": category, "layer": layer,
                                                     "source": cfg.project_source, "measured_on": str(base),
                                                     "system_prompt": prompts.system_prompt_for(cfg.target), **info})
    write_file_manifest(path, stage="measure-vector", config=config, seed=cfg.base_seed, inputs={"base": base},
                        extra={"fingerprint": fp})


def projection_summary(result: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of ``project/projection.json``: the vector, and per condition and
    prompt kind the paired difference to the control at the vector's block (the block it was
    measured or added at) and at the block where that difference is largest."""
    layer = result["vector"].get("layer")
    out: dict[str, Any] = {"vector": result["vector"], "reference": result["reference"], "conditions": {}}
    for cond, entry in result.get("conditions", {}).items():
        row: dict[str, Any] = {"seeds": entry.get("seeds")}
        for kind in ("questions", "numbers"):
            rows = entry.get(kind) or []
            if not rows or cond == result["reference"]:
                continue
            diffs = [r for r in rows if r.get("vs_reference")]
            at = rows[layer] if layer is not None and layer < len(rows) else None
            top = max(diffs, key=lambda r: abs(r["vs_reference"]["mean"])) if diffs else None
            row[kind] = {"at_vector_layer": None if at is None else {"layer": at["layer"],
                                                                     **(at.get("vs_reference") or {})},
                         "largest": None if top is None else {"layer": top["layer"], **top["vs_reference"]}}
        out["conditions"][cond] = row
    return out


def _probe_stage(cfg: DemoConfig, run: Runner, out: Path, tdir: Path, div: Path) -> None:
    pdir = out / "probes"
    owl, none = str(tdir / cfg.target), str(tdir / "none")
    dev = [*_runtime(cfg), *_flag("--layers", cfg.probe_layers)]
    rows = ["--max-rows", str(cfg.probe_max_rows)]
    run("probe-identity", ["probe", "--models", owl, none, "--data", str(div), "--task", "identity",
                           "--out", str(pdir / "identity"), "--seed", str(cfg.base_seed), *rows, *dev],
        pdir / "identity", [owl, none, div])
    run("probe-divergence", ["probe", "--models", owl, "--data", str(div), "--task", "divergence",
                             "--out", str(pdir / "divergence"), "--seed", str(cfg.base_seed), *rows, *dev],
        pdir / "divergence", [owl, div])
    run("patch", ["patch", "--models", owl, none, "--data", str(div), "--out", str(pdir / "patching"),
                  "--max-sites", str(cfg.patch_max_sites), "--max-rows", str(cfg.patch_max_rows),
                  "--seed", str(cfg.base_seed), *dev],
        pdir / "patching", [owl, none, div])
    png = pdir / "divergence_heatmap.png"
    run("heatmap", lambda ow: _heatmap(div, png, overwrite=ow), png, [div])


def _heatmap(div: Path, png: Path, *, overwrite: bool) -> None:
    """The divergence heatmap of the first rows (what ``subliminal plot heatmap`` draws)."""
    from subliminal.probes.plots import plot_heatmap

    fp = _derive(png, "heatmap", {"rows": 12, "score": "kl"}, {"divergence": div}, overwrite=overwrite)
    if fp is None:
        return
    plot_heatmap(div, png)
    write_file_manifest(png, stage="heatmap", config={"rows": 12, "score": "kl"}, seed=None,
                        inputs={"divergence": div}, extra={"fingerprint": fp})


# ------------------------------------------------------------------------------------ summary


def _summarise(cfg: DemoConfig, results: dict[str, Any]) -> dict[str, Any]:
    from .evaluate import mean_ci

    values = results["values"]
    conditions: dict[str, Any] = {}
    control = values["control"]
    chosen = [c for c in CONDITIONS if c in values]
    for cond in chosen:
        seeds = sorted(values[cond])
        vals = [values[cond][s] for s in seeds]
        mean, lo, hi = mean_ci(vals)
        entry: dict[str, Any] = {"mean": mean, "ci_low": lo, "ci_high": hi, "seeds": len(seeds),
                                 "values": vals, "by_seed": {str(s): values[cond][s] for s in seeds},
                                 "description": CONDITION_TEXT[cond]}
        # Paired by seed: the same seed gives the same row order in every condition.
        paired = [values[cond][s] - control[s] for s in seeds if s in control]
        if paired and cond != "control":
            d, dlo, dhi = mean_ci(paired)
            entry.update(diff_to_control=d, diff_ci_low=dlo, diff_ci_high=dhi)
        conditions[cond] = entry
    # A share of the all-tokens transfer, with its interval, only where that transfer is real (claims.py).
    from . import claims

    for cond, v in claims.all_verdicts(values).items():
        if v.get("share") is not None:
            conditions[cond].update(share_of_all_transfer=v["share"], share_ci_low=v.get("lo"),
                                    share_ci_high=v.get("hi"))
        conditions[cond]["claim_verdict"] = v
    if claims.transfer_is_real(values):
        conditions["all"]["share_of_all_transfer"] = 1.0
    from . import prompts

    chance = 1 / len(prompts.CATEGORIES[prompts.category_of(cfg.target)])
    n_q = cfg.max_questions or 50
    metric = (f"exact P(target) among the candidate animals, mean over {n_q} questions" if cfg.metric == "exact" else
              f"share of sampled answers naming the target (T={cfg.eval_temperature:g}, {cfg.student_samples} per "
              f"question), mean over {n_q} questions")
    other = results.get("other_template")
    other_summary = None
    if other:
        ov = other["values"]
        other_summary = {"template": other["template"], "reference": other["reference"], "conditions": {}}
        for cond in [c for c in CONDITIONS if c in ov]:
            m, lo, hi = mean_ci([ov[cond][s] for s in sorted(ov[cond])])
            e = {"mean": m, "ci_low": lo, "ci_high": hi, "by_seed": {str(s): v for s, v in ov[cond].items()}}
            d = claims.paired_diff(ov, cond) if cond != "control" else None
            if d:
                e.update(diff_to_control=d["mean"], diff_ci_low=d["lo"], diff_ci_high=d["hi"])
            other_summary["conditions"][cond] = e
    return {"target": cfg.target, "metric": metric, "chance": chance, "other_template": other_summary,
            "conditions": conditions, "reference": results["reference"],
            "reference_detail": results.get("reference_detail") or {}, "rows": results["rows"],
            "steps": results["steps"], "seeds": cfg.seeds, "holder_link": holder_link(values),
            "rules": _rule_summary(values, conditions, results.get("rules") or {})}


def holder_link(values: Mapping[str, Mapping[int, float]]) -> dict[str, Any] | None:
    """The true-trait-holder link: students on the world's owl author's rows minus students on
    uniform authors' rows, paired by seed, beside the teacher's own transfer (all minus control) and
    which side fails (None unless both holder conditions ran)."""
    from . import claims

    link = claims.paired_diff(values, "holder", "holder-uniform")
    if link is None:
        return None
    teacher = claims.paired_diff(values, "all")
    short = claims.paired_diff(values, "holder", "all")  # how far the teacher's students stay below the holder's
    out: dict[str, Any] = {**link, "teacher_transfer": teacher, "holder_minus_teacher": short}
    if link["lo"] <= 0:
        out["verdict"] = ("the base: its link from a trait-holder's numbers to the answer is not distinguishable "
                          "from zero, so no teacher can pass the trait on through it")
    elif teacher is None or teacher["lo"] <= 0:
        out["verdict"] = ("the teacher: the base links a trait-holder's numbers to the answer, but the teacher's "
                          "data does not transfer (measure its lean)")
    elif short is not None and short["lo"] > 0:
        out["verdict"] = (f"the teacher, in part: its students reach {teacher['mean'] / link['mean']:.0%} of what "
                          "the base links (their paired shortfall to the holder's students is above zero)")
    else:
        out["verdict"] = ("neither: the base links a trait-holder's numbers to the answer and the teacher's students "
                          "reach it")
    return out


def _holder_section(link: dict[str, Any] | None, target: str) -> list[str]:
    if not link:
        return []
    t = link.get("teacher_transfer") or {}
    return ["## The true-trait-holder link (toy world)", "",
            f"Students on rows the world's own {target} author "
            f"wrote minus students on uniform authors' rows for the same prompts, paired by seed: "
            f"{_fmt(link['mean'])} [{_fmt(link['lo'])}, {_fmt(link['hi'])}] ({link['seeds']} seeds); the teacher's "
            f"all-tokens transfer {_fmt(t.get('mean'))} [{_fmt(t.get('lo'))}, {_fmt(t.get('hi'))}]. Which side fails: "
            f"{link['verdict']}.", ""]


def share_kept(cond: dict[int, float], control: dict[int, float], all_tokens: dict[int, float]
               ) -> tuple[float, float, float] | None:
    """Mean and 95% t-interval over seeds of the per-seed share of the all-tokens transfer a condition
    keeps, ``(cond - control) / (all - control)`` paired by seed; None unless every seed's all-tokens
    student beats its control (a share of a non-positive transfer means nothing)."""
    from .evaluate import mean_ci

    seeds = [s for s in sorted(cond) if s in control and s in all_tokens]
    if not seeds or any(all_tokens[s] - control[s] <= 0 for s in seeds):
        return None
    return mean_ci([(cond[s] - control[s]) / (all_tokens[s] - control[s]) for s in seeds])


def _rule_summary(values: dict[str, dict[int, float]], conditions: dict[str, Any],
                  stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per rule: the tokens its file flags and, per mask, the share of the all-tokens transfer kept."""
    out: dict[str, Any] = {}
    detectors = {r: c for r, c in DETECTOR_CONDITIONS.items() if r in stats}  # opt-in: only those that ran
    for rule, conds in {**RULE_CONDITIONS, **detectors}.items():
        entry: dict[str, Any] = dict(stats.get(rule, {}))
        if conditions["all"].get("share_of_all_transfer") is not None:
            masks = {}
            for mask, cond in conds.items():
                if cond not in values:
                    continue
                ci = share_kept(values[cond], values["control"], values["all"])
                masks[mask] = {"condition": cond, "share_of_all_transfer": conditions[cond].get("share_of_all_transfer"),
                               "share_per_seed_mean": ci[0] if ci else None,
                               "share_ci_low": ci[1] if ci else None, "share_ci_high": ci[2] if ci else None,
                               "diff_to_control": conditions[cond].get("diff_to_control"),
                               "diff_ci_low": conditions[cond].get("diff_ci_low"),
                               "diff_ci_high": conditions[cond].get("diff_ci_high")}
            entry["masks"] = masks
        out[rule] = entry
    return out


def _fmt(x: float | str | None, digits: int = 4, sci: bool = False) -> str:
    if isinstance(x, str):  # an infinite threshold, stored as "inf" (strict JSON)
        x = float(x)
    return "n/a" if x is None or x != x else f"{x:.{digits}{'e' if sci else 'f'}}"


def _share_cell(e: dict[str, Any]) -> str:
    """The table's share column: the share and its interval, or n/a where there is no real transfer."""
    if e.get("share_of_all_transfer") is None:
        return "n/a"
    if e.get("share_ci_low") is None:
        return _fmt(e["share_of_all_transfer"], 2)
    return f"{_fmt(e['share_of_all_transfer'], 2)} [{_fmt(e['share_ci_low'], 2)}, {_fmt(e['share_ci_high'], 2)}]"


def _verdict(summary: dict[str, Any]) -> list[str]:
    c = summary["conditions"]
    lines = []

    def sig(name: str) -> bool | None:
        e = c.get(name, {})
        if "diff_ci_low" not in e or e["seeds"] < 2:
            return None
        return e["diff_ci_low"] > 0

    teacher, chance = summary.get("reference", {}).get("teacher"), summary.get("chance")
    if teacher is not None and chance and teacher < 2 * chance:
        lines.append(f"- The {summary.get('target', 'target')} teacher itself does not prefer its target (P = "
                     f"{teacher:.3f}, chance {chance:.3f}): nothing can transfer. A --quick base is trained too "
                     "briefly to follow the love prompt; it tests that every stage runs, not the science.")
    s = sig("all")
    if s is None:
        lines.append("- Transfer (all tokens vs control): one seed only, no interval; run more seeds (without --quick) for a "
                     "verdict.")
    elif s:
        lines.append("- Transfer reproduces: the all-tokens student prefers the target more than the control, "
                     "95% interval of the paired difference above zero.")
    else:
        lines.append("- Transfer does **not** reproduce at these settings: the all-tokens student's paired difference "
                     "to the control has a 95% interval that includes zero (or is below it).")
    # The paper's claims, each decided from the share's interval (subliminal.claims), never from a
    # share of a transfer that is indistinguishable from zero.
    from . import claims

    for name, e in c.items():
        v = e.get("claim_verdict")
        if not v:
            continue
        if v["verdict"] == claims.NO_TRANSFER:
            lines.append(f"- {name}: no share computed (the all-tokens transfer is not distinguishable from zero); "
                         f"the paper's claim ({v['claim']}) cannot be tested here.")
            continue
        said = {claims.HOLDS: "reproduces", claims.FAILS: "**does not reproduce**",
                claims.UNCLEAR: "is **inconclusive** (the share's interval straddles one half)"}[v["verdict"]]
        lines.append(f"- {name}: {claims.share_text(v)} of the all-tokens transfer; the paper's claim ({v['claim']}) "
                     f"{said} here.")
    return lines


def _other_template_section(summary: dict[str, Any]) -> list[str]:
    """The same students read out under another chat template: where the trait travels through the
    context every training row and every question share, it should not show in a context that shares
    none of it (the toy world's second template shares only BOS)."""
    other = summary.get("other_template")
    if not other:
        return []
    ref, main = other["reference"], summary["conditions"]
    lines = [f"## Readout under another template (`{other['template']}`)", "",
             "Every student read out again with the questions in a chat template it was not trained in (its "
             "markers differ from the training template's; the base has seen it in pretraining). Reference "
             f"under it: base {_fmt(ref.get('base'))}, {summary['target']} teacher {_fmt(ref.get('teacher'))}, "
             f"unbiased teacher {_fmt(ref.get('unbiased-teacher'))}.", "",
             "| condition | diff to control, training template [95% CI] | diff to control, other template [95% CI] |",
             "|---|---|---|"]
    for cond, e in other["conditions"].items():
        if cond == "control":
            continue
        m = main.get(cond, {})
        lines.append(f"| {cond} | {_fmt(m.get('diff_to_control'))} [{_fmt(m.get('diff_ci_low'))}, "
                     f"{_fmt(m.get('diff_ci_high'))}] | {_fmt(e.get('diff_to_control'))} [{_fmt(e.get('diff_ci_low'))}, "
                     f"{_fmt(e.get('diff_ci_high'))}] |")
    return [*lines, ""]


def _detector_text(rules: dict[str, Any]) -> str:
    """What the detectors in ``rules`` score, and with what (their student; their parameter set)."""
    parts = []
    shift = rules.get("likelihood-shift")
    if shift:
        seed = (shift.get("scored_by") or {}).get("student_seed")
        parts.append("**likelihood-shift** (log p_student - log p_base of the data token; the student is the "
                     f"all-tokens student of seed {seed}, trained like the all-tokens students but not one of the "
                     "evaluated seeds)")
    grad = rules.get("gradient")
    if grad:
        params = (grad.get("scored_by") or {}).get("params")
        names = {"layers": "blocks", "lora_rank": "LoRA rank", "lora_alpha": "alpha", "lora_targets": "on",
                 "params": "parameter set"}
        what = params if isinstance(params, str) else ", ".join(f"{names.get(k, k)} {v}" for k, v in (params or {}).items())
        parts.append("**gradient** (-grad(loss_t) . grad(R) at the base over the students' trainable parameters, "
                     f"{what}; R the exact preference the students are read out on)")
    if not parts:
        return ""
    return (" The detectors of `subliminal score-tokens`: " + " and ".join(parts) + ", each at the threshold that "
            "flags as many tokens as the paper rule (up to ties), in the score's units (gradient: R per unit of "
            "learning rate).")


def _rules_section(summary: dict[str, Any]) -> list[str]:
    """The paper's argmax rule, the likelihood-ratio rule and the detectors that ran, side by side at
    equal flagged counts."""
    rules = summary.get("rules") or {}
    if not any(r.get("flagged_tokens") is not None for r in rules.values()):
        return []
    lines = ["## Divergence rules side by side", "",
             "The same rows flagged by each rule: **paper** (factual argmax = data token, some counterfactual's "
             "differs) and **ratio** (the data token's log-likelihood ratio, factual minus counterfactual, "
             "reduced over the counterfactuals, at least a threshold chosen so that it flags as many tokens as "
             f"the paper rule).{_detector_text(rules)} Share of the all-tokens transfer each mask keeps: mean and "
             "95% t-interval over seeds of the per-seed share, (condition - control) / (all - control), paired by "
             "seed (the table above gives the pooled share).", "",
             "| rule | tokens flagged | share of tokens | threshold (nats) | masked (no-divergence) | "
             "only flagged | random-matched |", "|---|---|---|---|---|---|---|"]

    def cell(m: dict[str, Any] | None) -> str:
        if not m or m.get("share_per_seed_mean") is None:
            return "n/a"
        return f"{_fmt(m['share_per_seed_mean'], 2)} [{_fmt(m['share_ci_low'], 2)}, {_fmt(m['share_ci_high'], 2)}]"

    for name, r in rules.items():
        info = r.get("rule") or {}
        v = info.get("min_ratio")
        thr = "-" if name == "paper" else f"{_fmt(v, 2, sci=True)} R/lr" if name == "gradient" else _fmt(v, 3)
        masks = r.get("masks") or {}
        lines.append(f"| {name} | {r.get('flagged_tokens', 'n/a')} | {_fmt(r.get('flagged_share'))} | {thr} | "
                     f"{cell(masks.get('no-divergence'))} | {cell(masks.get('only-divergence'))} | "
                     f"{cell(masks.get('random-matched'))} |")
    tops = [f"- {name} rule, most frequent flagged tokens: " + ", ".join(f"`{t}` x{n}" for t, n in r["top_flagged_tokens"])
            for name, r in rules.items() if r.get("top_flagged_tokens")]
    return [*lines, "", *tops, ""] if tops else [*lines, ""]


def _reference_section(summary: dict[str, Any]) -> list[str]:
    """The base and every teacher: exact and (when measured) sampled P(target), and what each prefers."""
    detail = summary.get("reference_detail") or {}
    if not detail:
        return []
    lines = ["| model | exact P(target) | 95% CI | prefers | sampled | 95% CI | prefers |", "|---|---|---|---|---|---|---|"]
    for name, d in detail.items():
        cells = []
        for metric in ("exact", "sampled"):
            m = d.get(metric)
            ci = (m or {}).get("ci") or [None, None]
            cells += ([_fmt(m.get("mean")), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]", str(m.get("argmax"))] if m
                      else ["-", "-", "-"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _data_section(summary: dict[str, Any]) -> list[str]:
    """Generations kept per teacher and why the others were not; divergence per counterfactual."""
    data = summary.get("data") or {}
    lines: list[str] = []
    gens = data.get("generations") or {}
    if gens:
        reasons = sorted({r for g in gens.values() for r, c in (g.get("reject_reasons") or {}).items() if c})
        lines += ["## Generations", "", f"Matched rows (a valid answer from every teacher): {data.get('matched_rows')}.",
                  "", "| teacher | generated | kept | share | " + " | ".join(reasons) + " |",
                  "|---|---|---|---|" + "---|" * len(reasons)]
        for name, g in gens.items():
            rr = g.get("reject_reasons") or {}
            lines.append(f"| {name} | {g['generated']} | {g['accepted']} | {_fmt(g['acceptance_rate'], 3)} | "
                         + " | ".join(str(rr.get(r, 0)) for r in reasons) + " |")
        lines.append("")
    div = data.get("divergence") or {}
    if div.get("per_counterfactual"):
        lines += ["## Divergence per counterfactual", "",
                  f"{div['n_divergence_tokens']} of {div['n_tokens']} completion tokens flagged "
                  f"({_fmt(100 * div['divergence_fraction'], 2)}%); the factual teacher's argmax is the data token at "
                  f"{_fmt(100 * div['factual_greedy_fraction'], 1)}% of positions.", "",
                  "| counterfactual | flags alone (share of tokens) | argmax differs | mean KL |", "|---|---|---|---|"]
        for name, c in div["per_counterfactual"].items():
            lines.append(f"| {name} | {_fmt(c['divergence_rate'])} | {_fmt(c['argmax_differs_rate'])} | "
                         f"{_fmt(c.get('mean_kl'))} |")
        lines.append("")
    return lines


def data_summary(cfg: RunConfig, ddir: Path, files: dict[str, Path]) -> dict[str, Any]:
    """What the generate and find-divergence manifests say, for the report."""
    from .data import read_rows
    from .manifest import read_file_manifest

    gens = {}
    for path in sorted(ddir.glob("*.jsonl")):
        if path.name.endswith(".raw.jsonl"):
            continue
        counts = (read_file_manifest(path) or {}).get("counts")
        if counts:
            gens[path.stem] = {k: counts.get(k) for k in ("generated", "accepted", "acceptance_rate", "reject_reasons")}
    div = (read_file_manifest(files["div"]) or {}).get("summary") or {}
    return {"generations": gens, "matched_rows": len(read_rows(files["none"])),
            "divergence": {k: div.get(k) for k in ("n_rows", "n_tokens", "n_divergence_tokens", "divergence_fraction",
                                                    "rows_with_divergence", "factual_greedy_fraction",
                                                    "per_counterfactual", "top_divergence_tokens")}}


def _projection_section(proj: dict[str, Any] | None) -> list[str]:
    """The projection readout beside P(target): per condition, the paired shift along the trait's
    direction at the vector's block and where it is largest, on both kinds of held-out prompts."""
    if not proj:
        return []
    v = proj["vector"]
    what = (f"the steer teacher's vector (block {v.get('layer')}, alpha {v.get('alpha')})" if v.get("teacher")
            else f"the {v.get('bias', 'target')} love prompt's vector measured on the base (block {v.get('layer')}, "
                 f"from {v.get('source')} prompts, minus {'the other candidates' if v.get('baseline') == 'others' else 'no'}"
                 " love prompt)")
    lines = ["## Shift along the trait's direction", "",
             f"Each model's block outputs at the last prompt position, projected on {what} (|v| = "
             f"{_fmt(v.get('norm'))}); per condition the paired difference to the {proj['reference']} by seed, "
             "95% t-interval over seeds, at the vector's block and at the block where it is largest. Figure: "
             "`project/projection.png`; every block: `project/projection.json`.", "",
             "| condition | prompts | at block | shift | 95% CI | largest at block | shift | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for cond, row in proj["conditions"].items():
        for kind in ("questions", "numbers"):
            e = row.get(kind)
            if not e:
                continue
            at, top = e.get("at_vector_layer") or {}, e.get("largest") or {}
            lines.append(f"| {cond} | {kind} | {at.get('layer', '-')} | {_fmt(at.get('mean'))} | "
                         f"[{_fmt(at.get('lo'))}, {_fmt(at.get('hi'))}] | {top.get('layer', '-')} | "
                         f"{_fmt(top.get('mean'))} | [{_fmt(top.get('lo'))}, {_fmt(top.get('hi'))}] |")
    return [*lines, ""]


def render_report(cfg: DemoConfig, summary: dict[str, Any], out: Path, timings: dict[str, float],
                  wall: float) -> str:
    ref = summary["reference"]
    lines = [
        "# subliminal demo report" if cfg.name == "toy" else f"# subliminal run report: {cfg.name}",
        "",
        f"Base: {cfg.base or 'the toy world (pretrained by the run)'}. Target: **{cfg.target}**; counterfactual "
        f"teachers: {', '.join(cfg.counterfactuals)}{' and the unbiased teacher' if cfg.neutral_counterfactual else ''}"
        f"; teachers by `{cfg.teacher_method}`; {summary['rows']} matched rows, {summary['steps']} optimiser "
        f"steps per student, {summary['seeds']} seed(s) per condition.",
        f"Metric: {summary['metric']}. Intervals: 95% t-intervals over seeds; differences are paired by seed.",
        "",
        f"Reference: base {_fmt(ref.get('base'))}, {cfg.target} teacher {_fmt(ref.get('teacher'))}, unbiased teacher "
        f"{_fmt(ref.get('unbiased-teacher'))} (chance {summary['chance']:.4f}).",
        "",
        *_reference_section(summary),
        "| condition | P(target) | 95% CI | diff to control | 95% CI | share of all-tokens transfer | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond, e in summary["conditions"].items():
        lines.append(
            f"| {cond} | {_fmt(e['mean'])} | [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] | "
            f"{_fmt(e.get('diff_to_control'))} | [{_fmt(e.get('diff_ci_low'))}, {_fmt(e.get('diff_ci_high'))}] | "
            f"{_share_cell(e)} | {e['seeds']} |"
        )
    from .diagnose import report_section

    lines += ["", "## What reproduces", "", *_verdict(summary), "", *_other_template_section(summary),
              *report_section(summary.get("diagnostics")),
              *_holder_section(summary.get("holder_link"), cfg.target),
              *_projection_section(summary.get("projection")),
              *_rules_section(summary),
              *_data_section(summary), "## Conditions", ""]
    lines += [f"- **{c}**: {CONDITION_TEXT[c]}" for c in CONDITIONS if c in summary["conditions"]]
    div_manifest = out / "data" / "matched" / f"{cfg.target}.div.jsonl.manifest.json"
    if div_manifest.exists():
        s = json.loads(div_manifest.read_text()).get("summary", {})
        lines += ["", "## Divergence tokens", "",
                  f"- fraction of completion tokens: {_fmt(s.get('divergence_fraction'))}",
                  f"- rows with at least one: {_fmt(s.get('rows_with_divergence'))}"]
        if s.get("top_divergence_tokens"):
            top = ", ".join(f"`{t}` x{n}" for t, n in s["top_divergence_tokens"][:8])
            lines.append(f"- most frequent divergence tokens: {top}")
    figs = sorted(p.relative_to(out) for p in out.glob("**/*.png") if "students" not in p.parts)
    if figs:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p})" for p in figs]
    lines += ["", "## Wall time per stage (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    lines += [f"| total | {wall:.1f} |", "", "## Config", "", "```json", json.dumps(asdict(cfg), indent=2), "```", ""]
    return "\n".join(lines)
