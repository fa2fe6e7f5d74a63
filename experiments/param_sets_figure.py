#!/usr/bin/env python
"""Transfer per student parameter set, under the training template and another one, per base.

Reads finished runs that differ only in ``[students] params`` (or LoRA vs full), each run with
``[eval] other_template`` set so that every student was also read out under a context it did not
train in. A run is a single run directory (``results.json``) or an across-bases directory
(``base-K/results.json`` for each base). Per set, base and template: the paired difference of the
all-tokens students to the control students (mean over seeds, 95% t-interval; the run's own
numbers, not recomputed), and the share of the training-template transfer left under the other
template (a ratio of means, given only where the training-template interval excludes zero), and
the number loss the students reach (each student's ``loss.csv``: mean of its last ``--loss-tail``
steps, then mean over seeds; the owl-data students and, beside them, the controls).

Outputs in ``--out``: ``param_sets.json`` / ``.csv`` / ``.png`` / ``.md`` and ``manifest.json``.

    python experiments/param_sets_figure.py --out experiments/results/param_sets_organism \\
        --run "template rows=runs/organism" --run "all weights=runs/sets-all" --run "BOS row=runs/sets-bos"
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from subliminal.cli import guarded
from subliminal.distill import read_losses
from subliminal.manifest import (
    SubliminalError,
    write_figure_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)


def _runs(specs: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in out:
            raise SubliminalError(f"--run {spec!r}: expected LABEL=DIR with a new label")
        out[name] = Path(path)
    return out


def _results(run: Path) -> dict[str, Path]:
    """Base label -> results.json: the run itself, or each of its base-K directories."""
    if (run / "results.json").is_file() and not list(run.glob("base-*/results.json")):
        return {"-": run / "results.json"}
    found = {m.group(1): p for p in run.glob("base-*/results.json") if (m := re.fullmatch(r"base-(\d+)", p.parent.name))}
    if not found:
        raise SubliminalError(f"{run}: no results.json and no base-K/results.json (not a finished run)")
    return {k: found[k] for k in sorted(found, key=int)}


def _diff(cond: dict[str, Any] | None) -> dict[str, float] | None:
    if not cond or cond.get("diff_to_control") is None:
        return None
    return {"diff": cond["diff_to_control"], "low": cond["diff_ci_low"], "high": cond["diff_ci_high"]}


def final_loss(students: Path, condition: str, tail: int) -> float | None:
    """Mean over seeds of each ``CONDITION-sK`` student's last ``tail`` logged losses (one batch
    a step is noisy; the tail averages it), or None when no student logged any."""
    per_seed = []
    for d in sorted(students.glob(f"{condition}-s*")):
        losses = read_losses(d)[-tail:] if re.fullmatch(rf"{re.escape(condition)}-s\d+", d.name) else []
        if losses:
            per_seed.append(sum(losses) / len(losses))
    return sum(per_seed) / len(per_seed) if per_seed else None


def collect(runs: dict[str, Path], loss_tail: int = 10) -> list[dict[str, Any]]:
    """One row per set and base: transfer under both templates, and the loss reached."""
    rows = []
    for label, run in runs.items():
        for base, path in _results(run).items():
            res = json.loads(path.read_text())
            other = res.get("other_template")
            if not other:
                raise SubliminalError(f"{path}: no other-template readout (run with [eval] other_template)")
            train, alt = _diff(res["conditions"].get("all")), _diff(other["conditions"].get("all"))
            if train is None or alt is None:
                raise SubliminalError(f"{path}: no paired all-minus-control transfer")
            kept = alt["diff"] / train["diff"] if train["low"] > 0 or train["high"] < 0 else None
            rows.append({"set": label, "base": base, "template": other["template"], "train": train, "other": alt,
                         "kept_under_other": kept, "seeds": res.get("seeds"), "steps": res.get("steps"),
                         "loss_all": final_loss(path.parent / "students", "all", loss_tail),
                         "loss_control": final_loss(path.parent / "students", "control", loss_tail),
                         "results": str(path)})
    return rows


def table_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["set", "base", "other_template", "train_diff", "train_low", "train_high", "other_diff", "other_low",
                "other_high", "kept_under_other", "seeds", "steps", "loss_all", "loss_control"])
    for r in rows:
        w.writerow([r["set"], r["base"], r["template"], *(r["train"][k] for k in ("diff", "low", "high")),
                    *(r["other"][k] for k in ("diff", "low", "high")), r["kept_under_other"], r["seeds"], r["steps"],
                    r["loss_all"], r["loss_control"]])
    return buf.getvalue()


def _cell(d: dict[str, float]) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _loss(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| set | base | training template | other template | kept | loss (control) |", "|---|---|---|---|---|---|"]
    for r in rows:
        kept = "-" if r["kept_under_other"] is None else f"{r['kept_under_other']:.0%}"
        lines.append(f"| {r['set']} | {r['base']} | {_cell(r['train'])} | {_cell(r['other'])} (`{r['template']}`) | {kept} "
                     f"| {_loss(r['loss_all'])} ({_loss(r['loss_control'])}) |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    fig, axes = plt.subplots(1, len(sets), figsize=(3.6 * len(sets), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], sets):
        mine = [r for r in rows if r["set"] == name]
        for j, (key, colour, label) in enumerate((("train", "C0", "training template"), ("other", "C3", "other template"))):
            xs = [i + (j - 0.5) * 0.3 for i in range(len(mine))]
            ys = [r[key]["diff"] for r in mine]
            err = [[r[key]["diff"] - r[key]["low"] for r in mine], [r[key]["high"] - r[key]["diff"] for r in mine]]
            ax.errorbar(xs, ys, yerr=err, fmt="o", color=colour, capsize=3, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(mine)), [r["base"] for r in mine])
        ax.set_xlabel("base")
        ax.set_title(name)
    axes[0][0].set_ylabel("P(target): all-tokens minus control (95% CI)")
    axes[0][0].legend(fontsize=7)
    write_figure_atomic(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", required=True, metavar="LABEL=DIR",
                   help="a finished run (or across-bases run) of one parameter set; repeat, in plot order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--loss-tail", type=int, default=10, help="steps at the end of each student's loss.csv to average")
    args = p.parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    runs = _runs(args.run)
    if args.loss_tail < 1:
        raise SubliminalError(f"--loss-tail {args.loss_tail}: must be at least 1")
    rows = collect(runs, args.loss_tail)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "param_sets.json", {"rows": rows})
    write_text_atomic(out / "param_sets.csv", table_csv(rows))
    write_text_atomic(out / "param_sets.md", render(rows))
    plot(rows, out / "param_sets.png")
    write_manifest(out, stage="param-sets-figure", config={"runs": {k: str(v) for k, v in runs.items()}, "loss_tail": args.loss_tail}, seed=None,
                   inputs={r["set"] + "/" + r["base"]: Path(r["results"]) for r in rows})
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
