"""The protocol on several independently pretrained bases, and what holds on all of them.

CPU pretraining is not bit-identical across machines, so a number measured on one toy base is not
what a user who clones the repository sees; a conclusion that holds on every base is. This stage
runs the whole protocol (``pipeline.run_pipeline``) once per base seed, each into its own
directory (so every base resumes and refuses like a single run), and writes one table and one
figure: per base and condition the paired difference to the control with its interval, the spread
over bases, and each of the paper's claims decided per base (``subliminal.claims``).
"""

from __future__ import annotations

import csv
import io
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import claims
from .manifest import SubliminalError, write_json_atomic, write_manifest, write_text_atomic
from .pipeline import CONDITIONS, RunConfig, run_pipeline
from .stats import mean_ci

RESULTS, TABLE, REPORT, FIGURE = "robustness.json", "robustness.csv", "ROBUSTNESS.md", "robustness.png"
DIAG_FIGURE = "diagnostics_vs_transfer.png"
# (name in the table, path in diagnose.json, what it predicts)
DIAGNOSTICS = [("lean (nats/token)", ("lean", "teacher_rows", "nats_per_token")),
               ("link, first order", ("link", "link_predicted")),
               ("coverage (cosine)", ("coverage", "cosine")),
               # measured on the pretrained base itself (toy world): the numbers -> answer link it grew
               ("base link P(author's favourite)", ("base_world", "p_author_favourite")),
               # students on the world's own trait-holder's rows minus uniform authors' (holder conditions)
               ("true-holder link (students)", ("holder_link", "mean"))]


@dataclass
class RobustnessConfig:
    """A run config and the base seeds it is repeated on."""

    run: RunConfig
    base_seeds: list[int]
    out: Path
    overwrite: bool = False  # redo a base's stages whose finished output was made with other settings


def parse_seeds(text: str) -> list[int]:
    """``0-4`` or ``0,1,7`` (or both, ``0-2,9``) as a sorted list of distinct seeds."""
    seeds: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ValueError
                seeds.update(range(a, b + 1))
            elif part:
                seeds.add(int(part))
    except ValueError:
        raise SubliminalError(f"--base-seeds {text!r}: give seeds as 0-4 or 0,1,7 (non-negative integers)") from None
    if not seeds or min(seeds) < 0:
        raise SubliminalError(f"--base-seeds {text!r}: give at least one non-negative seed")
    return sorted(seeds)


def base_dir(out: Path, seed: int) -> Path:
    return out / f"base-{seed}"


def run(cfg: RobustnessConfig) -> dict[str, Any]:
    """Every base in turn (each resumable on its own), then the table, figure and report."""
    if cfg.run.seeds < 2:
        raise SubliminalError("--base-seeds needs at least 2 student seeds per condition (students.seeds) for "
                              "per-base intervals")
    t0 = time.time()
    cfg.out.mkdir(parents=True, exist_ok=True)
    per_base = {}
    for k in cfg.base_seeds:
        per_base[k] = run_pipeline(replace(cfg.run, base_seed=k), base_dir(cfg.out, k), overwrite=cfg.overwrite)
        per_base[k]["base_world"] = base_world(base_dir(cfg.out, k))
    result = aggregate(per_base)
    result.update(config={"run": cfg.run.name, "base_seeds": cfg.base_seeds, "given_base": cfg.run.base})
    write_json_atomic(cfg.out / RESULTS, result)
    write_text_atomic(cfg.out / TABLE, table_csv(result))
    plot(result, cfg.out / FIGURE)
    if result["diagnostics"]["points"]:
        plot_diagnostics(result, cfg.out / DIAG_FIGURE)
    write_text_atomic(cfg.out / REPORT, render(result, cfg))
    write_manifest(cfg.out, stage="robustness", config={"run": cfg.run, "base_seeds": cfg.base_seeds},
                   seed=cfg.base_seeds[0], inputs={f"base-{k}": base_dir(cfg.out, k) / "results.json"
                                                   for k in cfg.base_seeds},
                   wall_time_s=time.time() - t0)
    return result


def base_world(run_dir: Path) -> dict[str, Any]:
    """What a toy base the run pretrained grew (its ``eval.json``): the numbers -> answer link and the
    love prompt's pull on the numbers; empty for a given base or one evaluated before these existed."""
    import json

    path = run_dir / "base" / "eval.json"
    if not path.is_file():
        return {}
    ev = json.loads(path.read_text())
    out = {}
    if "author_link" in ev:
        out["p_author_favourite"] = ev["author_link"]["p_author_favourite"]
    if "favourite_mass_with_prompt" in ev.get("numbers", {}):
        out["favourite_mass_with_prompt"] = ev["numbers"]["favourite_mass_with_prompt"]
    return out


def seed_values(summary: dict[str, Any]) -> dict[str, dict[int, float]]:
    """Per condition, P(target) per student seed, from a run's results.json."""
    out = {}
    for cond, e in summary["conditions"].items():
        by_seed = e.get("by_seed")
        if by_seed is None:  # results.json from before by_seed: values are in seed order 1..n
            by_seed = {i + 1: v for i, v in enumerate(e["values"])}
        out[cond] = {int(s): float(v) for s, v in by_seed.items()}
    return out


def aggregate(per_base: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per base: each condition's paired difference to the control and each claim's verdict; over
    bases: median, range, mean with its t-interval over bases, and how many bases agree."""
    bases: dict[str, Any] = {}
    for k, summary in per_base.items():
        values = seed_values(summary)
        diffs = {c: claims.paired_diff(values, c) for c in values if c != "control"}
        bases[str(k)] = {
            "diffs": {c: d for c, d in diffs.items() if d is not None},
            "transfer_real": claims.transfer_is_real(values),
            "verdicts": claims.all_verdicts(values),
            "soft_minus_all": claims.soft_vs_hard(values),
            "reference": summary.get("reference", {}),
            "rows": summary.get("rows"), "steps": summary.get("steps"),
        }
    conds = [c for c in CONDITIONS if c != "control" and any(c in b["diffs"] for b in bases.values())]
    across: dict[str, Any] = {}
    for c in conds:
        means = [b["diffs"][c]["mean"] for b in bases.values() if c in b["diffs"]]
        m, lo, hi = mean_ci(means) if len(means) > 1 else (means[0], float("nan"), float("nan"))
        across[c] = {"mean": m, "lo": lo, "hi": hi, "median": statistics.median(means), "min": min(means),
                     "max": max(means), "bases": len(means),
                     "bases_above_zero": sum(b["diffs"][c]["lo"] > 0 for b in bases.values() if c in b["diffs"]),
                     "bases_below_zero": sum(b["diffs"][c]["hi"] < 0 for b in bases.values() if c in b["diffs"])}
    diag_points = []
    for k, summary in per_base.items():
        d, a = dict(summary.get("diagnostics") or {}), bases[str(k)]["diffs"].get("all")
        if summary.get("base_world"):
            d["base_world"] = summary["base_world"]
        if summary.get("holder_link"):
            d["holder_link"] = summary["holder_link"]
        if d and a:
            diag_points.append({"base": k, "transfer": a["mean"],
                                **{name: _dig(d, path) for name, path in DIAGNOSTICS}})
    claim_tally: dict[str, dict[str, int]] = {}
    for b in bases.values():
        for c, v in b["verdicts"].items():
            claim_tally.setdefault(c, {}).setdefault(v["verdict"], 0)
            claim_tally[c][v["verdict"]] += 1
    return {"bases": bases, "across": across, "claims": claim_tally, "conditions": conds,
            "diagnostics": {"points": diag_points, "spearman": {name: spearman_ci([p[name] for p in diag_points],
                                                                                 [p["transfer"] for p in diag_points])
                                                                for name, _ in DIAGNOSTICS}}}


def _dig(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return float(d) if isinstance(d, (int, float)) else None


def spearman_ci(x: list[float | None], y: list[float], n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Spearman's rank correlation of a diagnostic with the measured transfer over bases, with a
    percentile interval from resampling bases (None where fewer than 4 bases have both)."""
    import numpy as np
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if a is not None and a == a]
    if len(pairs) < 4:
        return {"rho": None, "lo": None, "hi": None, "n": len(pairs)}
    xa, ya = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    rho = float(spearmanr(xa, ya).statistic)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(pairs), len(pairs))
        if len(set(xa[i])) > 1 and len(set(ya[i])) > 1:
            boot.append(spearmanr(xa[i], ya[i]).statistic)
    lo, hi = (np.quantile(boot, [0.025, 0.975]) if boot else (float("nan"), float("nan")))
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n": len(pairs)}


def table_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["base_seed", "condition", "diff_to_control", "ci_low", "ci_high", "student_seeds", "verdict", "share",
                "share_ci_low", "share_ci_high"])
    for k, b in result["bases"].items():
        for c in result["conditions"]:
            d = b["diffs"].get(c)
            if d is None:
                continue
            v = b["verdicts"].get(c, {})
            w.writerow([k, c, d["mean"], d["lo"], d["hi"], d["seeds"], v.get("verdict", ""), v.get("share", ""),
                        v.get("lo", ""), v.get("hi", "")])
    return buf.getvalue()


def _f(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None or x != x else f"{x:+.{digits}f}"


def render(result: dict[str, Any], cfg: RobustnessConfig) -> str:
    seeds = ", ".join(result["bases"])
    lines = [f"# Across bases: `{cfg.run.name}` on base seeds {seeds}", ""]
    if cfg.run.base:
        lines += [f"Every run starts from the given base `{cfg.run.base}`: the seeds vary teachers' data and "
                  "students only, not the pretraining.", ""]
    lines += ["Paired difference of each condition to the control (P(target), students paired by seed, "
              f"{cfg.run.seeds} student seeds per condition, 95% t-interval) per base, then over bases: the "
              "median and range of the per-base means, their mean with a 95% t-interval over bases, and the "
              "number of bases whose own interval lies above (below) zero.", ""]
    head = "| condition | " + " | ".join(f"base {k}" for k in result["bases"]) + " | median [min, max] | mean over bases [95% CI] | bases > 0 (< 0) |"
    lines += [head, "|" + "---|" * (len(result["bases"]) + 4)]
    for c in result["conditions"]:
        cells = []
        for b in result["bases"].values():
            d = b["diffs"].get(c)
            cells.append("-" if d is None else f"{_f(d['mean'])} [{_f(d['lo'])}, {_f(d['hi'])}]")
        a = result["across"][c]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {_f(a['median'])} [{_f(a['min'])}, {_f(a['max'])}] | "
                     f"{_f(a['mean'])} [{_f(a['lo'])}, {_f(a['hi'])}] | {a['bases_above_zero']} "
                     f"({a['bases_below_zero']}) of {a['bases']} |")
    lines += ["", "## The paper's claims, per base", "",
              "A claim is decided only where the all-tokens transfer is distinguishable from zero on that base and "
              "the share it keeps (paired bootstrap over seeds) has a 95% interval on one side of one half; "
              "otherwise it is inconclusive, and no share is printed for a transfer indistinguishable from zero.",
              "", "| condition | claim | " + " | ".join(f"base {k}" for k in result["bases"]) + " |",
              "|---|---|" + "---|" * len(result["bases"])]
    for cond, claim, _ in claims.CLAIMS:
        if cond not in result["claims"]:
            continue
        cells = []
        for b in result["bases"].values():
            v = b["verdicts"].get(cond)
            cells.append("-" if v is None else f"{v['verdict']} ({claims.share_text(v)})"
                         if v["verdict"] != claims.NO_TRANSFER else "no transfer")
        lines.append(f"| {cond} | {claim} | " + " | ".join(cells) + " |")
    soft = [b["soft_minus_all"] for b in result["bases"].values() if b.get("soft_minus_all")]
    if soft:
        lines += ["", "Soft minus all-tokens students per base: " + ", ".join(
            f"{_f(s['mean'])} [{_f(s['lo'])}, {_f(s['hi'])}]" for s in soft), ""]
    dg = result.get("diagnostics") or {}
    if dg.get("points"):
        lines += ["", "## Diagnostics against the measured transfer", "",
                  "Per base: the transfer diagnostics of `subliminal diagnose`, the link the toy base grew in "
                  "pretraining (its `eval.json`), where the holder conditions ran the true-trait-holder link "
                  "(students on the world's own trait-holder's rows minus uniform authors' rows, paired by seed; "
                  "students, not a pre-student measure), and the all-tokens student's paired difference to the "
                  "control; Spearman's rho over bases with a 95% percentile interval from resampling bases (few "
                  f"bases: read the interval). Figure: `{DIAG_FIGURE}`.", "",
                  "| base | all - control | " + " | ".join(n for n, _ in DIAGNOSTICS) + " |",
                  "|---|---|" + "---|" * len(DIAGNOSTICS)]
        for p in dg["points"]:
            lines.append(f"| {p['base']} | {_f(p['transfer'])} | " + " | ".join(
                "n/a" if p[n] is None else f"{p[n]:+.4g}" for n, _ in DIAGNOSTICS) + " |")
        lines.append("| Spearman rho [95% CI] | | " + " | ".join(
            "n/a" if dg["spearman"][n]["rho"] is None else
            f"{dg['spearman'][n]['rho']:+.2f} [{dg['spearman'][n]['lo']:+.2f}, {dg['spearman'][n]['hi']:+.2f}]"
            for n, _ in DIAGNOSTICS) + " |")
    lines += ["", f"Figure: `{FIGURE}`; data: `{TABLE}`, `{RESULTS}`; each base's own REPORT.md under `base-K/`.", ""]
    return "\n".join(lines)


def _rho(sp: dict[str, Any]) -> str:
    return "n/a" if sp["rho"] is None else f"{sp['rho']:+.2f}"


def plot_diagnostics(result: dict[str, Any], path: Path) -> None:
    """Each diagnostic against the measured all-tokens transfer, one point per base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["diagnostics"]["points"]
    fig, axes = plt.subplots(1, len(DIAGNOSTICS), figsize=(4 * len(DIAGNOSTICS), 3.4))
    for ax, (name, _) in zip(axes, DIAGNOSTICS):
        xy = [(p[name], p["transfer"], p["base"]) for p in pts if p[name] is not None]
        ax.scatter([a for a, _, _ in xy], [b for _, b, _ in xy])
        for a, b, k in xy:
            ax.annotate(str(k), (a, b), fontsize=7)
        sp = result["diagnostics"]["spearman"][name]
        ax.set_title(f"{name}\nrho = {_rho(sp)}",
                     fontsize=9)
        ax.set_xlabel(name)
    axes[0].set_ylabel("all tokens - control (P(target))")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot(result: dict[str, Any], path: Path) -> None:
    """Per condition, every base's paired difference to the control with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds, bases = result["conditions"], list(result["bases"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(conds) + 2), 4.2))
    width = 0.8 / max(1, len(bases))
    for j, k in enumerate(bases):
        xs, ys, lo, hi = [], [], [], []
        for i, c in enumerate(conds):
            d = result["bases"][k]["diffs"].get(c)
            if d is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(d["mean"])
            lo.append(d["mean"] - d["lo"])
            hi.append(d["hi"] - d["mean"])
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, capsize=2, label=f"base {k}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(conds)))
    ax.set_xticklabels(conds, rotation=35, ha="right")
    ax.set_ylabel("P(target): condition - control (paired)")
    ax.set_title("Transfer per condition on each base (95% CI over student seeds)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
