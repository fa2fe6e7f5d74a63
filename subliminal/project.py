"""``subliminal project``: how far a model's residual stream lies along a teacher's steering vector.

Why a stage of its own and not a ``probe`` task: the readout fits nothing (no probe, no held-out
split of sites, no TransformerLens/nnsight backend), it needs a vector rather than two models,
and its students come grouped by condition and seed so that, like the preference readout, each
condition is compared with the control **paired by seed** (:func:`subliminal.claims.paired_diff`).

For every model it reads each block's output (``blocks.{l}.hook_resid_post``, every layer) at
the last prompt position of two kinds of held-out prompts (:func:`subliminal.steer.prompt_texts`,
split ``readout``: the odd-indexed preference questions, and number prompts of a stream the
vector was never measured on) and projects it on the unit vector ``v / |v|``. Per model: the mean
over prompts with a 95% t-interval (:func:`subliminal.stats.mean_ci`). Per condition: the mean
over seeds of the per-seed means, and the paired difference to the reference condition. With
``--checkpoints`` each student's ``checkpoint-*`` directories give the curve over training.
A model is read as every stage reads it (:func:`subliminal.models.load_model`): a prompt teacher
with its system prompt, a steer teacher with its own vector added.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import prompts
from .cliutil import add_model_runtime, add_overwrite, add_seed, device_type
from .manifest import (
    SubliminalError,
    check_not_input,
    check_resume,
    check_writable,
    fingerprint,
    read_json,
    read_manifest,
    write_json_atomic,
    write_manifest,
)

STAGE = "project"
KINDS = ("questions", "numbers")
RESULT = "projection.json"


@dataclass
class ProjectConfig:
    vector: str  # a steer teacher directory or a .safetensors file
    out: str
    models: list[str] = field(default_factory=list)
    students: list[tuple[str, int, str]] = field(default_factory=list)  # (condition, seed, model dir)
    reference: str = "control"
    category: str | None = None  # default: the teacher's category, else animal
    number_prompts: int = 64
    checkpoints: bool = False
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    overwrite: bool = False


# ----------------------------------------------------------------------------------- the vector


def read_vector(spec: str) -> tuple[Any, dict[str, Any]]:
    """The vector of a steer teacher directory or a vector file, and what is known of it."""
    from .steer import load_vector, vector_info_path
    from .teachers import is_teacher_dir, read_teacher

    if is_teacher_dir(spec):
        t = read_teacher(spec)
        if t.method != "steer":
            raise SubliminalError(f"--vector {spec}: a {t.method} teacher has no steering vector; give a steer "
                                  "teacher (`subliminal teach --method steer`) or a .safetensors vector file")
        s = t.extra["steer"]
        v = load_vector(s["vector"], f"--vector {spec}")
        info = {"teacher": spec, "bias": t.bias, "category": t.category, "layer": s["layer"], "alpha": s["alpha"],
                "source": s.get("source")}
    else:
        v = load_vector(spec, "--vector")
        info = {"file": spec}
        described = vector_info_path(spec)  # a vector measured by `subliminal run` says where it lives
        if described.is_file():
            known = read_json(described, "vector description")
            info.update({k: known[k] for k in ("bias", "category", "layer", "source", "baseline", "measured_on")
                         if k in known})
    norm = v.norm().item()
    if v.dim() != 1 or not norm > 0 or not math.isfinite(norm):
        raise SubliminalError(f"--vector {spec}: needs a 1-D vector with a finite, non-zero norm (norm {norm})")
    return v, {**info, "norm": norm, "width": v.numel()}


# ------------------------------------------------------------------------------------- readouts


def projections(loaded: Any, unit: Any, *, n_numbers: int, seed: int, category: str, batch_size: int
                ) -> dict[str, Any]:
    """``{kind: [n_prompts, n_layers]}`` projections of one loaded model on ``unit``."""
    from .steer import check_vector, last_residuals, prompt_texts

    check_vector(unit, loaded.model, f"--vector (model {loaded.source})")
    out = {}
    for kind in KINDS:
        texts = prompt_texts(loaded.tokenizer, kind, category=category, split="readout", n_numbers=n_numbers,
                             seed=seed)
        acts = last_residuals(loaded.model, loaded.tokenizer, texts, system_prompt=loaded.system_prompt,
                              batch_size=batch_size)
        out[kind] = acts @ unit.float()
    return out


def summarise(proj: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per kind, per layer: mean over prompts and 95% t-interval."""
    from .stats import mean_ci

    out = {}
    for kind, p in proj.items():
        rows = []
        for layer in range(p.shape[1]):
            m, lo, hi = mean_ci(p[:, layer].tolist())
            rows.append({"layer": layer, "mean": m, "lo": lo, "hi": hi, "n": int(p.shape[0])})
        out[kind] = rows
    return out


def read_model(spec: str, unit: Any, cfg: ProjectConfig, category: str) -> dict[str, list[dict[str, Any]]]:
    from .models import load_model

    loaded = load_model(spec, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    return summarise(projections(loaded, unit, n_numbers=cfg.number_prompts, seed=cfg.seed, category=category,
                                 batch_size=cfg.batch_size))


def conditions(per_student: dict[tuple[str, int], dict[str, list[dict[str, Any]]]], reference: str
               ) -> dict[str, Any]:
    """Per condition, kind and layer: the mean over seeds (95% t-interval over seeds) and the
    paired difference to ``reference`` by seed (None below two shared seeds)."""
    from .claims import paired_diff
    from .stats import mean_ci

    conds = list(dict.fromkeys(c for c, _ in per_student))
    kinds = list(next(iter(per_student.values())))
    n_layers = len(next(iter(per_student.values()))[kinds[0]])
    out: dict[str, Any] = {}
    for c in conds:
        seeds = sorted(s for cc, s in per_student if cc == c)
        entry: dict[str, Any] = {"seeds": seeds}
        for kind in kinds:
            rows = []
            for layer in range(n_layers):
                values = {cc: {s: per_student[(cc, s)][kind][layer]["mean"] for cc2, s in per_student if cc2 == cc}
                          for cc in conds}
                m, lo, hi = mean_ci([values[c][s] for s in seeds])
                row: dict[str, Any] = {"layer": layer, "mean": m, "lo": lo, "hi": hi}
                if c != reference:
                    row["vs_reference"] = paired_diff(values, c, reference)
                rows.append(row)
            entry[kind] = rows
        out[c] = entry
    return out


def curve(student: str, unit: Any, cfg: ProjectConfig, category: str) -> list[dict[str, Any]]:
    """The student's projections at each saved checkpoint (then its final model)."""
    from subliminal.probes.cli import checkpoints_of

    return [{"step": step, "dir": path, **read_model(path, unit, cfg, category)}
            for step, path in checkpoints_of(student)]


# ---------------------------------------------------------------------------------------- figure


def plot(result: dict[str, Any], out_png: Path) -> Path:
    """One column per prompt kind: projection per layer per model / condition (95% bands), and
    below it each condition's paired difference to the reference."""
    from subliminal.probes.plots import _band, _save, plt

    paired = any(c != result["reference"] for c in result["conditions"])
    fig, axes = plt.subplots(2 if paired else 1, len(KINDS), figsize=(5.2 * len(KINDS), 7 if paired else 3.8),
                             squeeze=False)
    for j, kind in enumerate(KINDS):
        ax = axes[0][j]
        i = 0
        for name, s in result["models"].items():
            rows = s[kind]
            _band(ax, [r["layer"] for r in rows], [r["mean"] for r in rows], [(r["lo"], r["hi"]) for r in rows],
                  name, color=f"C{i % 10}", linestyle="--")
            i += 1
        for name, s in result["conditions"].items():
            rows = s[kind]
            _band(ax, [r["layer"] for r in rows], [r["mean"] for r in rows], [(r["lo"], r["hi"]) for r in rows],
                  f"{name} (n={len(s['seeds'])})", color=f"C{i % 10}")
            i += 1
        ax.set_title(f"{kind}: projection on v/|v|", fontsize=10)
        ax.set_xlabel("layer (block output)")
        ax.set_ylabel("mean projection")
        ax.legend(fontsize=7)
        if paired:
            ax = axes[1][j]
            for k, (name, s) in enumerate(result["conditions"].items()):
                if name == result["reference"]:
                    continue
                pts = [(r["layer"], r["vs_reference"]) for r in s[kind] if r.get("vs_reference")]
                if pts:
                    _band(ax, [p[0] for p in pts], [p[1]["mean"] for p in pts],
                          [(p[1]["lo"], p[1]["hi"]) for p in pts], name,
                          color=f"C{(len(result['models']) + k) % 10}")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{kind}: minus {result['reference']}, paired by seed", fontsize=10)
            ax.set_xlabel("layer (block output)")
            ax.set_ylabel("projection - reference")
            ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_png)


def plot_curves(result: dict[str, Any], out_png: Path) -> Path:
    """Each student's projection over training at the steer layer (the last layer for a bare
    vector file), per prompt kind, with 95% bands over prompts; the data beside it as CSV."""
    from subliminal.probes.plots import plot_transfer

    layer = result["vector"].get("layer")
    records = []
    for student, points in result["curves"].items():
        for p in points:
            for kind in KINDS:
                r = p[kind][layer if layer is not None else -1]
                records.append({"series": f"{student} {kind}", "step": p["step"], "value": r["mean"], "lo": r["lo"],
                                "hi": r["hi"]})
    where = f"block {layer}" if layer is not None else "the last block"
    return plot_transfer(records, out_png, ylabel=f"projection on v/|v| at {where}")


def csv_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, s in result["models"].items():
        rows += [{"series": name, "kind": k, **r} for k in KINDS for r in s[k]]
    for name, s in result["conditions"].items():
        for k in KINDS:
            for r in s[k]:
                d = r.get("vs_reference") or {}
                rows.append({"series": f"condition:{name}", "kind": k, "layer": r["layer"], "mean": r["mean"],
                             "lo": r["lo"], "hi": r["hi"], "n": len(s["seeds"]), "diff": d.get("mean"),
                             "diff_lo": d.get("lo"), "diff_hi": d.get("hi")})
    return rows


# ------------------------------------------------------------------------------------------- run


def _check(cfg: ProjectConfig) -> None:
    if not cfg.models and not cfg.students:
        raise SubliminalError("nothing to read: give --model DIR and/or --student CONDITION SEED DIR")
    if cfg.number_prompts <= 1:
        raise SubliminalError(f"--number-prompts must be at least 2 (an interval needs two), got {cfg.number_prompts}")
    if cfg.batch_size <= 0:
        raise SubliminalError(f"--batch-size must be positive, got {cfg.batch_size}")
    if cfg.category is not None and cfg.category not in prompts.CATEGORIES:
        raise SubliminalError(f"--category {cfg.category}: one of {', '.join(prompts.CATEGORIES)}")
    seen = set()
    for c, s, d in cfg.students:
        if (c, s) in seen:
            raise SubliminalError(f"--student {c} {s}: given twice; one model per condition and seed")
        seen.add((c, s))
        if not Path(d).is_dir():
            raise SubliminalError(f"--student {c} {s} {d}: no such model directory")
    if cfg.students and cfg.reference not in {c for c, _, _ in cfg.students}:
        raise SubliminalError(f"no --student {cfg.reference} SEED DIR: the paired readout compares every condition "
                              f"with the {cfg.reference!r} students (set --reference to another condition)")
    for m in cfg.models:
        if not Path(m).exists() and not m.startswith("hf:"):
            raise SubliminalError(f"--model {m}: no such model directory")


def run(cfg: ProjectConfig) -> int:
    t0 = time.time()
    _check(cfg)
    out = Path(cfg.out)
    inputs = {"vector": cfg.vector, **{f"model{i}": m for i, m in enumerate(cfg.models)},
              **{f"student:{c}:{s}": d for c, s, d in cfg.students}}
    check_not_input({"--out": out}, inputs, dirs=("--out",))
    check_writable(out, is_dir=True)
    vector, vinfo = read_vector(cfg.vector)
    category = cfg.category or vinfo.get("category") or "animal"
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "overwrite", "device")}
    config["device"] = device_type(cfg.device)
    fp = fingerprint(inputs, config)
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and man.get("stage") == STAGE else None
    occupied = out.is_dir() and finished is None and any(out.iterdir())
    if check_resume(out, fp, overwrite=cfg.overwrite, stage=STAGE, finished=finished,
                    occupied=occupied) == "skip":
        print(f"projection {out}: already read by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    unit = vector / vector.norm()
    names = [Path(m).name or m for m in cfg.models]
    names = names if len(set(names)) == len(names) else list(cfg.models)
    models = {n: read_model(m, unit, cfg, category) for n, m in zip(names, cfg.models)}
    per_student = {(c, s): read_model(d, unit, cfg, category) for c, s, d in cfg.students}
    result: dict[str, Any] = {
        "vector": vinfo, "category": category, "reference": cfg.reference, "kinds": list(KINDS),
        "site": "block outputs (blocks.L.hook_resid_post) at the last prompt position, projected on v/|v|",
        "prompts": {"questions": "odd-indexed preference questions (held out from a measured vector)",
                    "numbers": f"{cfg.number_prompts} number prompts (stream steer-readout:{cfg.seed})"},
        "interval": "95% t-interval over prompts (models), over seeds (conditions), over seeds of the paired "
                    "difference (vs_reference)",
        "models": models,
        "students": {f"{c}:{s}": {"condition": c, "seed": s, "dir": d, **per_student[(c, s)]}
                     for c, s, d in cfg.students},
        "conditions": conditions(per_student, cfg.reference) if per_student else {},
    }
    if cfg.checkpoints:
        result["curves"] = {f"{c}:{s}": curve(d, unit, cfg, category) for c, s, d in cfg.students}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULT, result, nan_as_null=True)
    from subliminal.probes.plots import _write_csv

    _write_csv(out / "projection.csv", csv_rows(result))
    plot(result, out / "projection.png")
    if cfg.checkpoints and result["curves"]:
        plot_curves(result, out / "projection_curve.png")
    write_manifest(out, stage=STAGE, config=config, seed=cfg.seed, inputs=inputs, wall_time_s=time.time() - t0,
                   extra={"fingerprint": fp, "vector": vinfo})
    _report(result, out)
    return 0


def _report(result: dict[str, Any], out: Path) -> None:
    layer = result["vector"].get("layer")
    for name, s in result["conditions"].items():
        for kind in KINDS:
            rows = s[kind]
            # the steer layer where known; for a bare vector file, the layer of the largest difference
            r = rows[layer] if layer is not None else max(
                rows, key=lambda x: abs((x.get("vs_reference") or {}).get("mean", 0.0)))
            d = r.get("vs_reference")
            if d:
                where = f"layer {r['layer']}" if layer is not None else f"largest at layer {r['layer']}"
                print(f"{name} - {result['reference']} ({kind}, {where}): {d['mean']:+.4f} "
                      f"[{d['lo']:+.4f}, {d['hi']:+.4f}] over {d['seeds']} seeds")
    print(f"projection -> {out / RESULT}, {out / 'projection.png'}")


# ------------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="readout: residual stream projected on a teacher's steering vector, per layer",
                       description="For each model (and each student, grouped by condition and seed), the mean "
                       "projection of every block's output on the unit steering vector at the last prompt position "
                       "of held-out preference questions and number prompts, with 95%% intervals; each condition's "
                       "paired difference to the control by seed. Writes projection.json, projection.csv, "
                       "projection.png and manifest.json.")
    p.add_argument("--vector", required=True,
                   help="a steer teacher directory (`teach --method steer`) or a .safetensors vector file")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="a model or teacher directory to read (repeat); e.g. the base and the steer teacher itself")
    p.add_argument("--student", action="append", nargs=3, default=[], metavar=("CONDITION", "SEED", "DIR"),
                   help="a student of CONDITION trained with SEED (repeat); conditions are paired with "
                   "--reference by seed")
    p.add_argument("--reference", default="control", help="the condition others are compared with (default "
                   "%(default)s)")
    p.add_argument("--category", choices=list(prompts.CATEGORIES), default=None,
                   help="preference questions of this category (default: the teacher's, else animal)")
    p.add_argument("--number-prompts", type=int, default=64, help="held-out number prompts (default %(default)s)")
    p.add_argument("--checkpoints", action="store_true",
                   help="also read each student's checkpoint-* directories: the curve over training")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default %(default)s)")
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    students = []
    for c, s, d in args.student:
        try:
            seed = int(s)
        except ValueError:
            raise SubliminalError(f"--student {c} {s} {d}: SEED must be an integer, got {s!r}") from None
        students.append((c, seed, d))
    return run(ProjectConfig(vector=args.vector, out=args.out, models=list(args.model), students=students,
                             reference=args.reference, category=args.category, number_prompts=args.number_prompts,
                             checkpoints=args.checkpoints, batch_size=args.batch_size, seed=args.seed,
                             device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                             overwrite=args.overwrite))
