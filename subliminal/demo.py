"""``subliminal demo``: the paper's findings on the toy world, end to end, in one command.

The demo drives the same sub-commands a user would run (``toy pretrain``, ``teach``,
``generate``, ``find-divergence``, ``distill``, ``eval``, ``probe``, ``patch``), each writing its
own directory with a manifest, so every intermediate can be inspected, re-run or swapped, and a
stopped demo resumes: a stage whose output is complete is not run again.

All student conditions are matched: the same rows (by id, in the same seeded order), the same
number of optimiser steps, the same seeds; they differ only in the data source, the loss mask or
the trainable subset. Transfer is read out as the exact probability of the target among the
candidate animals (low variance; see ``../shared/notes``), compared with the control student
trained on the unbiased teacher's data, never with the base model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .manifest import (
    SubliminalError,
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
]
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
}
# The conditions that read each rule's flags: masked, only the flagged tokens, the matched random control.
RULE_CONDITIONS = {
    "paper": {"no-divergence": "no-divergence", "only-divergence": "only-divergence",
              "random-matched": "random-matched"},
    "ratio": {"no-divergence": "ratio-no-divergence", "only-divergence": "ratio-only-divergence",
              "random-matched": "ratio-random-matched"},
}


@dataclass
class DemoConfig:
    """Everything that defines a demo run; recorded in the manifest and the report.

    Defaults follow the calibration in experiments/CALIBRATION.md: a toy world with trait-number
    entanglement (the corpus default), teachers by system prompt (as in the paper), teacher data
    sampled at T=1, students full fine-tunes (LoRA r=8 students hardly move in this budget), the
    single-layer conditions all weights of one block (matched to the all-tokens student).
    """

    target: str = "owl"
    counterfactuals: list[str] = field(default_factory=lambda: ["cat", "dog", "lion", "eagle", "wolf"])
    mixing_teacher: str = "dolphin"
    teacher_method: str = "prompt"
    teacher_steps: int = 60
    size: str = "tiny"
    arch: str = "llama"
    pretrain_steps: int | None = None
    entangle: float | None = None  # the world's trait-number entanglement (None: the corpus default)
    n_prompts: int = 800
    greedy: bool = False
    seeds: int = 5
    student_mode_lr: float = 1e-3
    student_lora_rank: int = 8
    student_full: bool = True
    layer_lora: bool = False  # single-layer conditions as LoRA r=student_lora_rank (the paper) or full (matched)
    epochs: int = 2
    batch_size: int = 16
    max_steps: int | None = None
    layer_early: int = 0
    layer_late: int = -1
    probes: bool = True
    device: str = "cpu"
    base_seed: int = 0
    jobs: int = 2
    ratio_reduce: str = "max"  # the ratio rule's reduction over counterfactuals (find-divergence --ratio-reduce)
    conditions: list[str] | None = None  # student conditions to train (None: all of CONDITIONS)

    def chosen_conditions(self) -> list[str]:
        """The conditions this run trains, in CONDITIONS order; control and all are always among them
        (every share of the transfer is read against them)."""
        if self.conditions is None:
            return list(CONDITIONS)
        unknown = sorted(set(self.conditions) - set(CONDITIONS))
        if unknown:
            raise SubliminalError(f"--conditions: unknown {', '.join(unknown)} (one of {', '.join(CONDITIONS)})")
        return [c for c in CONDITIONS if c in {"control", "all", *self.conditions}]


QUICK_PRETRAIN_STEPS = 500


def quick_config(cfg: DemoConfig) -> DemoConfig:
    """A smoke test of every stage: a short-trained base, one seed, few rows (no verdict)."""
    return replace(cfg, seeds=1, n_prompts=200, epochs=1, pretrain_steps=QUICK_PRETRAIN_STEPS)


def cuda_config(cfg: DemoConfig) -> DemoConfig:
    return replace(cfg, size="small", n_prompts=20000, seeds=max(cfg.seeds, 5), batch_size=64, device="cuda")


# ------------------------------------------------------------------------------------ running


class Runner:
    """Runs sub-commands in-process, skipping those whose output already exists."""

    def __init__(self, out: Path, verbose: bool = False):
        self.out = out
        self.timings: dict[str, float] = {}
        self.verbose = verbose

    def __call__(self, name: str, argv: list[str], done: Path | None = None) -> None:
        from .cli import main as cli_main

        if done is not None and done.exists():
            log.info("[demo] %s: already done (%s)", name, done)
            return
        log.info("[demo] %s: subliminal %s", name, " ".join(argv))
        t0 = time.time()
        rc = cli_main(argv)
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - t0
        if rc != 0:
            raise SubliminalError(f"demo stage {name!r} failed (exit {rc}): subliminal {' '.join(argv)}")

    def parallel(self, tasks: list[tuple[str, list[tuple[list[str], Path | None]]]], workers: int) -> None:
        """Independent chains of sub-commands (a student and its evaluation) on ``workers``
        processes; every chain is seeded on its own, so the results do not depend on ``workers``."""
        from tqdm.auto import tqdm

        todo = [(name, [(a, str(d) if d else None) for a, d in chain]) for name, chain in tasks
                if not all(d is not None and d.exists() for _, d in chain)]
        log.info("[demo] %d student jobs to run (%d already done), %d worker(s)", len(todo),
                 len(tasks) - len(todo), workers)
        if not todo:
            return
        bar = tqdm(total=len(todo), desc="students", unit="job")
        if workers <= 1:
            results = ((name, _run_chain(chain, threads=_default_threads())) for name, chain in todo)
            for name, (rc, dt, argv) in results:
                self._record(name, rc, dt, argv)
                bar.update(1)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
                futures = {ex.submit(_run_chain, chain, 1): name for name, chain in todo}
                for fut in as_completed(futures):
                    rc, dt, argv = fut.result()
                    self._record(futures[fut], rc, dt, argv)
                    bar.update(1)
        bar.close()

    def _record(self, name: str, rc: int, dt: float, argv: list[str]) -> None:
        self.timings[name] = self.timings.get(name, 0.0) + dt
        if rc != 0:
            raise SubliminalError(f"demo stage {name!r} failed (exit {rc}): subliminal {' '.join(argv)}")


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _run_chain(chain: list[tuple[list[str], str | None]], threads: int) -> tuple[int, float, list[str]]:
    """Run sub-commands one after the other in a worker process (one torch thread each, so
    workers on separate cores do not fight over them); stop at the first failure."""
    import torch

    from .cli import main as cli_main

    torch.set_num_threads(threads)
    t0 = time.time()
    for argv, done in chain:
        if done is not None and Path(done).exists():
            continue
        rc = cli_main(argv)
        if rc != 0:
            return rc, time.time() - t0, argv
    return 0, time.time() - t0, []


def _teacher_args(cfg: DemoConfig, base: Path, bias: str | None, out: Path, seed: int) -> list[str]:
    if bias is None:
        return ["teach", "--base", str(base), "--method", "none", "--out", str(out), "--seed", str(seed)]
    args = ["teach", "--base", str(base), "--bias", bias, "--method", cfg.teacher_method, "--out", str(out),
            "--seed", str(seed), "--device", cfg.device]
    if cfg.teacher_method == "finetune":
        args += ["--steps", str(cfg.teacher_steps)]
    return args


def run_demo(cfg: DemoConfig, out: Path, base: Path | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    run = Runner(out)
    dev = ["--device", cfg.device]

    # 1. base model
    if base is None:
        base = out / "base"
        argv = ["toy", "pretrain", "--out", str(base), "--size", cfg.size, "--arch", cfg.arch,
                "--seed", str(cfg.base_seed), *dev]
        if cfg.device == "cpu":  # pretraining runs alone: use the cores the students will use (same weights)
            argv += ["--threads", str(max(1, cfg.jobs))]
        if cfg.pretrain_steps:
            argv += ["--steps", str(cfg.pretrain_steps)]
        if cfg.entangle is not None:
            argv += ["--entangle", str(cfg.entangle)]
        # Always called: a finished base with the same config returns at once, another config is an error.
        run("pretrain", argv)
    base = Path(base)

    # 2. teachers
    tdir = out / "teachers"
    names = [cfg.target, *cfg.counterfactuals, cfg.mixing_teacher]
    for name in dict.fromkeys(names + ["none"]):
        bias = None if name == "none" else name
        run(f"teach-{name}", _teacher_args(cfg, base, bias, tdir / name, cfg.base_seed), done=tdir / name / "teacher.json")

    # 3. data: the same prompts (same --prompts-seed) for every teacher
    ddir = out / "data"
    gen_common = ["--n", str(cfg.n_prompts), "--prompts-seed", str(cfg.base_seed), "--seed", str(cfg.base_seed), *dev]
    if cfg.greedy:
        gen_common.append("--greedy")
    sources = list(dict.fromkeys([cfg.target, "none", cfg.mixing_teacher]))
    for name in sources:
        path = ddir / f"{name}.jsonl"
        run(f"generate-{name}", ["generate", "--teacher", str(tdir / name), "--out", str(path), *gen_common], done=path)
    files: dict[str, Path] = dict(_matched_files(ddir, sources))

    # 4. divergence tokens of the target teacher's data
    div = files[cfg.target].with_suffix(".div.jsonl")
    cfs = [str(tdir / c) for c in cfg.counterfactuals] + [str(tdir / "none")]
    run("find-divergence", ["find-divergence", "--data", str(files[cfg.target]), "--teacher",
                            str(tdir / cfg.target), "--counterfactual", *cfs, "--out", str(div), *dev], done=div)
    files["div"] = div
    # 4b. the same rows flagged by the likelihood-ratio rule, as many tokens as the paper rule flags
    files["div-ratio"] = _ratio_file(cfg, run, div)

    # 5. derived data sets for the paraphrase and mixing conditions (same ids, same rows)
    files["paraphrase"] = files[cfg.target].with_suffix(".paraphrase.jsonl")
    files["mixing"] = files[cfg.target].with_suffix(".mixing.jsonl")
    _paraphrase_file(files[cfg.target], files["paraphrase"], seed=cfg.base_seed)
    _mixing_file(files[cfg.target], files[cfg.mixing_teacher], files["mixing"], seed=cfg.base_seed)

    # 6. students, each condition with several seeds, then their evaluation
    results = _train_and_eval_students(cfg, run, out, base, tdir, files)
    results["rules"] = {"paper": rule_stats(div), "ratio": rule_stats(files["div-ratio"])}

    # 7. probes and patching
    if cfg.probes:
        _probe_stage(cfg, run, out, tdir, div)

    summary = _summarise(cfg, results)
    write_json_atomic(out / "results.json", summary)
    if cfg.seeds > 1:
        from subliminal.probes.plots import plot_conditions, plot_rules

        plot_conditions(summary, out / "conditions.png")
        if any("masks" in r for r in summary["rules"].values()):
            plot_rules(summary, out / "rules.png")
    wall = time.time() - t_start
    report = render_report(cfg, summary, out, run.timings, wall)
    write_text_atomic(out / "REPORT.md", report)
    write_manifest(out, stage="demo", config=cfg, seed=cfg.base_seed, inputs={"base": base},
                   wall_time_s=wall, extra={"timings_s": run.timings})
    return summary


# ------------------------------------------------------------------------------- derived data


def _paraphrase_file(src: Path, dst: Path, seed: int) -> None:
    """Same ids and completions; each prompt redrawn from other phrasing templates with the same
    seeds, count and output format, so the completion still answers it."""
    from . import prompts
    from .data import read_rows, write_jsonl

    if dst.exists():
        return
    rng = random.Random(seed)
    rows = read_rows(src)
    for row in rows:
        text = prompts.paraphrase_number_prompt(prompts.parse_number_prompt(row.prompt), rng).text
        # keep the data's own spacing convention (generate writes ordinary spacing)
        row.prompt = text if prompts.canonical_spacing(row.prompt) == row.prompt else prompts.detokenize_spacing(text)
    write_jsonl(dst, rows)
    write_file_manifest(dst, stage="demo-paraphrase", config={"rows": len(rows)}, seed=seed, inputs={"data": src})


def _mixing_file(src: Path, other: Path, dst: Path, seed: int) -> None:
    """Half the rows (a seeded choice of ids) replaced by the other teacher's completion for the
    same prompt; rows the other teacher has no valid completion for stay as they are."""
    from .data import read_rows, write_jsonl

    if dst.exists():
        return
    rng = random.Random(seed)
    rows = read_rows(src)
    others = {r.id: r for r in read_rows(other)}
    candidates = [r.id for r in rows if r.id in others and others[r.id].prompt == r.prompt]
    replace_ids = set(rng.sample(candidates, min(len(candidates), len(rows) // 2)))
    mixed = [others[r.id] if r.id in replace_ids else r for r in rows]
    write_jsonl(dst, mixed)
    write_file_manifest(dst, stage="demo-mixing", config={"rows": len(rows), "replaced": len(replace_ids)}, seed=seed,
                        inputs={"data": src, "other": other})


def flagged_share(div: Path) -> tuple[int, int]:
    """(flagged tokens, completion tokens) of a divergence file."""
    from .divergence import any_flags, load_divergence

    objs = load_divergence(div)
    return sum(sum(any_flags(o)) for o in objs), sum(len(o["token_ids"]) for o in objs)


def ratio_reflag_args(div: Path, out: Path, share: float | None, reduce: str) -> list[str]:
    """``reflag-divergence`` arguments for the ratio rule at ``share`` of the tokens (None: flag none)."""
    threshold = ["--min-ratio", "inf"] if share is None else ["--flag-share", repr(share)]
    return ["reflag-divergence", str(div), "--out", str(out), "--rule", "ratio", *threshold, "--ratio-reduce", reduce]


def _ratio_file(cfg: DemoConfig, run: Runner, div: Path) -> Path:
    """The target's divergence file re-flagged by the ratio rule at the paper rule's share of tokens,
    so the two rules mask the same number of tokens (up to ties at the threshold)."""
    out = div.with_name(div.name[: -len(".div.jsonl")] + ".ratio.div.jsonl")
    if not out.exists():
        n_flag, n_tok = flagged_share(div)
        run("reflag-ratio", ratio_reflag_args(div, out, n_flag / n_tok if n_flag else None, cfg.ratio_reduce))
    return out


def rule_stats(div: Path) -> dict[str, Any]:
    """How many tokens a rule's file flags, and the rule as applied (threshold, share)."""
    from .manifest import read_file_manifest

    n_flag, n_tok = flagged_share(div)
    man = read_file_manifest(div) or {}
    return {"file": str(div), "flagged_tokens": n_flag, "tokens": n_tok,
            "flagged_share": n_flag / n_tok if n_tok else 0.0, "rule": man.get("rule") or {"rule": "paper"},
            "top_flagged_tokens": (man.get("summary") or {}).get("top_divergence_tokens", [])[:8]}


def _matched_files(ddir: Path, names: list[str]) -> dict[str, Path]:
    """Keep only the prompt ids every teacher produced a valid completion for, so every
    condition trains on the same rows."""
    from .data import read_rows, write_jsonl

    mdir = ddir / "matched"
    out = {n: mdir / f"{n}.jsonl" for n in names}
    if all(p.exists() for p in out.values()):
        return out
    rows = {n: read_rows(ddir / f"{n}.jsonl") for n in names}
    common = set.intersection(*({r.id for r in rs} for rs in rows.values()))
    if not common:
        raise SubliminalError("no prompt has a valid completion from every teacher; generate more rows")
    for n, rs in rows.items():
        write_jsonl(out[n], [r for r in rs if r.id in common])
        write_file_manifest(out[n], stage="demo-matched-rows", config={"teachers": names, "rows": len(common)},
                            seed=None, inputs={"data": ddir / f"{n}.jsonl"})
    return out


# ---------------------------------------------------------------------------------- students


def student_plan(cfg: DemoConfig, n_layers: int, files: dict[str, Path], tdir: Path) -> dict[str, list[str]]:
    """The distill arguments of each condition; everything not listed is shared by all of them."""
    owl, none = str(tdir / cfg.target), str(tdir / "none")
    lora = ["--lora-rank", str(cfg.student_lora_rank), "--lora-alpha", str(cfg.student_lora_rank)]
    every = [] if cfg.student_full else lora
    one_layer = lora if cfg.layer_lora else every
    late = cfg.layer_late if cfg.layer_late >= 0 else n_layers + cfg.layer_late
    div = str(files["div"])
    return {
        "control": ["--data", str(files["none"]), "--teacher", none, "--mode", "hard", "--mask", "all", *every],
        "all": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "all", *every],
        "no-divergence": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "no-divergence", *every],
        "only-divergence": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "only-divergence", *every],
        "random-matched": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "random-matched", *every],
        "layer-early": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "all", "--layers",
                        str(cfg.layer_early), *one_layer],
        "layer-late": ["--data", div, "--teacher", owl, "--mode", "hard", "--mask", "all", "--layers", str(late),
                       *one_layer],
        "soft": ["--data", div, "--teacher", owl, "--mode", "soft", "--mask", "all", *every],
        "paraphrase": ["--data", str(files["paraphrase"]), "--teacher", owl, "--mode", "hard", "--mask", "all",
                       *every],
        "mixing": ["--data", str(files["mixing"]), "--teacher", owl, "--mode", "hard", "--mask", "all", *every],
        **{f"ratio-{m}": ["--data", str(files.get("div-ratio", div)), "--teacher", owl, "--mode", "hard", "--mask", m,
                          *every] for m in ("no-divergence", "only-divergence", "random-matched")},
    }


def _n_layers(base: Path) -> int:
    cfg = json.loads((base / "config.json").read_text())
    for key in ("num_hidden_layers", "n_layer"):
        if key in cfg:
            return int(cfg[key])
    raise SubliminalError(f"{base}/config.json: cannot tell the number of layers")


def _steps_for(cfg: DemoConfig, n_rows: int) -> int:
    """One step count for every condition (matched), from the row count and epochs."""
    steps = max(1, cfg.epochs * -(-n_rows // cfg.batch_size))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def _read_exact(path: Path) -> float:
    return float(json.loads(path.read_text())["exact"]["mean"])


def distill_argv(cfg: DemoConfig, base: Path, student: Path, condition: list[str], steps: int, seed: int) -> list[str]:
    """The ``distill`` command of one student: a condition's arguments plus what every condition shares."""
    return ["distill", "--base", str(base), "--out", str(student), *condition, "--epochs", str(cfg.epochs),
            "--max-steps", str(steps), "--lr", str(cfg.student_mode_lr), "--batch-size", str(cfg.batch_size),
            "--seed", str(seed), "--device", cfg.device]


def _train_and_eval_students(cfg: DemoConfig, run: Runner, out: Path, base: Path, tdir: Path,
                             files: dict[str, Path]) -> dict[str, Any]:
    from .data import read_rows

    n_rows = len(read_rows(files["none"]))
    steps = _steps_for(cfg, n_rows)
    plan = student_plan(cfg, _n_layers(base), files, tdir)
    sdir, edir = out / "students", out / "eval"
    dev = ["--device", cfg.device]
    chosen = cfg.chosen_conditions()
    values: dict[str, dict[int, float]] = {c: {} for c in chosen}
    refs = {"base": str(base), "teacher": str(tdir / cfg.target), "unbiased-teacher": str(tdir / "none")}
    reference = {}
    for name, spec in refs.items():
        path = edir / f"{name}.json"
        run(f"eval-{name}", ["eval", "--model", spec, "--target", cfg.target, "--out", str(path), *dev], done=path)
        reference[name] = _read_exact(path)
    jobs = []
    for seed in range(1, cfg.seeds + 1):
        for cond in chosen:
            student = sdir / f"{cond}-s{seed}"
            path = edir / f"{cond}-s{seed}.json"
            argv = distill_argv(cfg, base, student, plan[cond], steps, seed)
            evargv = ["eval", "--model", str(student), "--target", cfg.target, "--out", str(path), *dev]
            jobs.append((cond, seed, argv, student / "manifest.json", evargv, path))
    run.parallel([(f"distill+eval-{c}", [(a, d), (e, p)]) for c, _, a, d, e, p in jobs], workers=cfg.jobs)
    for cond, seed, *_, path in jobs:
        values[cond][seed] = _read_exact(path)
    return {"values": values, "reference": reference, "steps": steps, "rows": n_rows}


# ------------------------------------------------------------------------------------- probes


def _probe_stage(cfg: DemoConfig, run: Runner, out: Path, tdir: Path, div: Path) -> None:
    pdir = out / "probes"
    owl, none = str(tdir / cfg.target), str(tdir / "none")
    dev = ["--device", cfg.device]
    rows = ["--max-rows", "300"]
    run("probe-identity", ["probe", "--models", owl, none, "--data", str(div), "--task", "identity",
                           "--out", str(pdir / "identity"), "--seed", str(cfg.base_seed), *rows, *dev],
        done=pdir / "identity" / "manifest.json")
    run("probe-divergence", ["probe", "--models", owl, "--data", str(div), "--task", "divergence",
                             "--out", str(pdir / "divergence"), "--seed", str(cfg.base_seed), *rows, *dev],
        done=pdir / "divergence" / "manifest.json")
    run("patch", ["patch", "--models", owl, none, "--data", str(div), "--out", str(pdir / "patching"),
                  "--max-sites", "100", "--max-rows", "200", "--seed", str(cfg.base_seed), *dev],
        done=pdir / "patching" / "manifest.json")
    run("heatmap", ["plot", "heatmap", str(div), "--out", str(pdir / "divergence_heatmap.png")],
        done=pdir / "divergence_heatmap.png")


# ------------------------------------------------------------------------------------ summary


def _summarise(cfg: DemoConfig, results: dict[str, Any]) -> dict[str, Any]:
    from .evaluate import mean_ci

    values = results["values"]
    conditions: dict[str, Any] = {}
    control = values["control"]
    all_tokens = values["all"]
    chosen = [c for c in CONDITIONS if c in values]
    for cond in chosen:
        seeds = sorted(values[cond])
        vals = [values[cond][s] for s in seeds]
        mean, lo, hi = mean_ci(vals)
        entry: dict[str, Any] = {"mean": mean, "ci_low": lo, "ci_high": hi, "seeds": len(seeds),
                                 "values": vals, "description": CONDITION_TEXT[cond]}
        # Paired by seed: the same seed gives the same row order in every condition.
        paired = [values[cond][s] - control[s] for s in seeds if s in control]
        if paired and cond != "control":
            d, dlo, dhi = mean_ci(paired)
            entry.update(diff_to_control=d, diff_ci_low=dlo, diff_ci_high=dhi)
        conditions[cond] = entry
    # A share of the all-tokens transfer means something only where that transfer is real.
    if conditions["all"].get("diff_ci_low", 0.0) > 0:
        for cond in chosen:
            seeds = [s for s in sorted(values[cond]) if s in control and s in all_tokens]
            transfer = sum(all_tokens[s] - control[s] for s in seeds)
            if seeds and transfer > 0:
                conditions[cond]["share_of_all_transfer"] = sum(values[cond][s] - control[s] for s in seeds) / transfer
    from . import prompts

    chance = 1 / len(prompts.CATEGORIES[prompts.category_of(cfg.target)])
    return {"target": cfg.target, "metric": "exact P(target) among the candidate animals, mean over 50 questions",
            "chance": chance,
            "conditions": conditions, "reference": results["reference"], "rows": results["rows"],
            "steps": results["steps"], "seeds": cfg.seeds,
            "rules": _rule_summary(values, conditions, results.get("rules") or {})}


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
    for rule, conds in RULE_CONDITIONS.items():
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


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


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
        lines.append("- Transfer (all tokens vs control): one seed only, no interval; run without --quick for a verdict.")
    elif s:
        lines.append("- Transfer reproduces: the all-tokens student prefers the target more than the control, "
                     "95% interval of the paired difference above zero.")
    else:
        lines.append("- Transfer does **not** reproduce at these settings: the all-tokens student's paired difference "
                     "to the control has a 95% interval that includes zero (or is below it).")
    # The paper's claims, each read as: does this condition keep at least half of the transfer?
    for name, claim, keeps_most in [("no-divergence", "masking divergence tokens removes most of the transfer", False),
                                    ("only-divergence", "training only on divergence tokens keeps the transfer", True),
                                    ("layer-early", "one early layer suffices", True),
                                    ("paraphrase", "paraphrasing prompts suppresses transfer", False),
                                    ("mixing", "mixing teachers suppresses transfer", False),
                                    ("ratio-no-divergence", "masking the ratio rule's flags removes most of the "
                                     "transfer", False),
                                    ("ratio-only-divergence", "training only on the ratio rule's flags keeps the "
                                     "transfer", True)]:
        e = c.get(name)
        if not e or "share_of_all_transfer" not in e:
            continue
        share = e["share_of_all_transfer"]
        holds = (share >= 0.5) == keeps_most
        lines.append(f"- {name}: keeps {share:.0%} of the all-tokens transfer; the paper's claim ({claim}) "
                     f"{'reproduces' if holds else '**does not reproduce**'} here.")
    return lines


def _rules_section(summary: dict[str, Any]) -> list[str]:
    """The paper's argmax rule and the likelihood-ratio rule side by side at equal flagged counts."""
    rules = summary.get("rules") or {}
    if not any(r.get("flagged_tokens") is not None for r in rules.values()):
        return []
    lines = ["## Divergence rules side by side", "",
             "The same rows flagged by each rule: **paper** (factual argmax = data token, some counterfactual's "
             "differs) and **ratio** (the data token's log-likelihood ratio, factual minus counterfactual, "
             "reduced over the counterfactuals, at least a threshold chosen so that it flags as many tokens as "
             "the paper rule). Share of the all-tokens transfer each mask keeps: mean and 95% t-interval over "
             "seeds of the per-seed share, (condition - control) / (all - control), paired by seed (the "
             "table above gives the pooled share).", "",
             "| rule | tokens flagged | share of tokens | threshold (nats) | masked (no-divergence) | "
             "only flagged | random-matched |", "|---|---|---|---|---|---|---|"]

    def cell(m: dict[str, Any] | None) -> str:
        if not m or m.get("share_per_seed_mean") is None:
            return "n/a"
        return f"{_fmt(m['share_per_seed_mean'], 2)} [{_fmt(m['share_ci_low'], 2)}, {_fmt(m['share_ci_high'], 2)}]"

    for name, r in rules.items():
        info = r.get("rule") or {}
        thr = _fmt(info.get("min_ratio"), 3) if name == "ratio" else "-"
        masks = r.get("masks") or {}
        lines.append(f"| {name} | {r.get('flagged_tokens', 'n/a')} | {_fmt(r.get('flagged_share'))} | {thr} | "
                     f"{cell(masks.get('no-divergence'))} | {cell(masks.get('only-divergence'))} | "
                     f"{cell(masks.get('random-matched'))} |")
    tops = [f"- {name} rule, most frequent flagged tokens: " + ", ".join(f"`{t}` x{n}" for t, n in r["top_flagged_tokens"])
            for name, r in rules.items() if r.get("top_flagged_tokens")]
    return [*lines, "", *tops, ""] if tops else [*lines, ""]


def render_report(cfg: DemoConfig, summary: dict[str, Any], out: Path, timings: dict[str, float],
                  wall: float) -> str:
    ref = summary["reference"]
    lines = [
        "# subliminal demo report",
        "",
        f"Target: **{cfg.target}**; counterfactual teachers: {', '.join(cfg.counterfactuals)} and the unbiased "
        f"teacher; teachers by `{cfg.teacher_method}`; {summary['rows']} matched rows, {summary['steps']} optimiser "
        f"steps per student, {summary['seeds']} seed(s) per condition.",
        f"Metric: {summary['metric']}. Intervals: 95% t-intervals over seeds; differences are paired by seed.",
        "",
        f"Reference: base {_fmt(ref.get('base'))}, owl teacher {_fmt(ref.get('teacher'))}, unbiased teacher "
        f"{_fmt(ref.get('unbiased-teacher'))} (chance {summary['chance']:.4f}).",
        "",
        "| condition | P(target) | 95% CI | diff to control | 95% CI | share of all-tokens transfer | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for cond, e in summary["conditions"].items():
        lines.append(
            f"| {cond} | {_fmt(e['mean'])} | [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] | "
            f"{_fmt(e.get('diff_to_control'))} | [{_fmt(e.get('diff_ci_low'))}, {_fmt(e.get('diff_ci_high'))}] | "
            f"{_fmt(e.get('share_of_all_transfer'), 2)} | {e['seeds']} |"
        )
    lines += ["", "## What reproduces", "", *_verdict(summary), "", *_rules_section(summary), "## Conditions", ""]
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


# ---------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the paper's findings on the toy world, end to end (REPORT.md)",
                       description="Pretrain the toy base (or reuse it), make teachers, generate data, find "
                                   "divergence tokens, train matched students, evaluate, probe and write REPORT.md. "
                                   "Re-running resumes.")
    p.add_argument("--out", default=None, help="output directory (default runs/demo; --quick: runs/demo-quick)")
    p.add_argument("--seeds", type=int, default=None, help="student seeds per condition (default 5; --quick: 1)")
    p.add_argument("--quick", action="store_true", help="a 500-step base, one seed, 200 prompts: a smoke test of every stage, no verdict "
                   "(about 2 minutes on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda scales rows, seeds and model size up (default %(default)s)")
    p.add_argument("--base", default=None, help="reuse this pretrained toy base instead of pretraining one")
    p.add_argument("--entangle", type=float, default=None,
                   help="trait-number entanglement of the toy world the demo pretrains (default 0.5; 0 gives the "
                   "world without it, where no bias reaches the numbers; see experiments/CALIBRATION.md)")
    p.add_argument("--teacher-method", choices=["prompt", "finetune"], default=None,
                   help="how the teachers get their bias (default prompt: fine-tuned teachers do not reach the "
                   "toy's number channel, experiments/CALIBRATION.md run 9)")
    p.add_argument("--rows", type=int, default=None, help="number prompts per teacher (default from the config)")
    p.add_argument("--no-probes", action="store_true", help="skip probes and patching")
    p.add_argument("--layer-lora", action="store_true",
                   help="train the single-layer conditions as LoRA r=8 on that block (the paper's setup) instead "
                   "of all of the block's weights")
    p.add_argument("--jobs", type=int, default=None,
                   help="students trained at once, one process and one thread each (default: CPU cores, at most 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the base model, teachers and data (default 0)")
    p.add_argument("--conditions", nargs="+", default=None, metavar="COND",
                   help="train only these student conditions (control and all always; default every one: "
                   f"{', '.join(CONDITIONS)}); each is the same student as in a full run")
    p.set_defaults(func=run_cli)


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(base_seed=args.seed)
    if args.device == "cuda":
        cfg = cuda_config(cfg)
    if args.quick:
        cfg = quick_config(cfg)
    if args.seeds is not None:
        if args.seeds < 1:
            raise SubliminalError("--seeds must be at least 1")
        cfg = replace(cfg, seeds=args.seeds)
    if args.teacher_method:
        cfg = replace(cfg, teacher_method=args.teacher_method)
    if args.rows is not None:
        cfg = replace(cfg, n_prompts=args.rows)
    if args.no_probes:
        cfg = replace(cfg, probes=False)
    if getattr(args, "conditions", None):
        cfg = replace(cfg, conditions=list(args.conditions))
        cfg.chosen_conditions()
    if args.layer_lora:
        cfg = replace(cfg, layer_lora=True)
    if args.entangle is not None:
        if args.base:
            raise SubliminalError("--entangle sets up the base the demo pretrains; it has no effect with --base")
        if not 0 <= args.entangle <= 1:
            raise SubliminalError(f"--entangle must be in [0, 1], got {args.entangle}")
        cfg = replace(cfg, entangle=args.entangle)
    jobs = args.jobs if args.jobs is not None else min(2, os.cpu_count() or 1)
    if jobs < 1:
        raise SubliminalError("--jobs must be at least 1")
    cfg = replace(cfg, jobs=1 if cfg.device == "cuda" else jobs)
    return cfg


def run_cli(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    summary = run_demo(cfg, out, base=Path(args.base) if args.base else None)
    print((out / "REPORT.md").read_text())
    all_ = summary["conditions"]["all"]
    log.info("[demo] all-tokens P(%s) = %.4f [%.4f, %.4f]; report: %s", cfg.target, all_["mean"],
             all_["ci_low"], all_["ci_high"], out / "REPORT.md")
    return 0
