#!/usr/bin/env python
"""Detector x intervention across bases: what each detector's flagged tokens carry, per base, from
the runs themselves.

Reads a finished ``subliminal run --base-seeds ...`` directory (``base-K/results.json``) or a
single run whose ``[students] conditions`` named the detector and intervention conditions
(``no-divergence``, ``ratio-*``, ``shift-*``, ``gradient-*``, ``replace-*``, ``corrupt-*``). Per
base and condition: the paired difference to the control (the run's own numbers) and the share of
the all-tokens transfer it keeps, with the verdict of its claim (``subliminal.claims``: a paired
bootstrap over seeds, given only where the all-tokens transfer is distinguishable from zero on that
base). Per detector: the tokens it flagged (the run's ``rules``).

Outputs in ``--out``: ``detector_bases.json`` / ``.csv`` / ``.md`` / ``.png`` and ``manifest.json``.

    python experiments/detector_bases_figure.py --run runs/organism --out experiments/results/detectors/bases
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from subliminal import claims
from subliminal.cli import guarded
from subliminal.manifest import (
    SubliminalError,
    write_figure_atomic,
    write_json_atomic,
    write_manifest,
    write_text_atomic,
)

# (row label, detector's rules key, flagged condition, matched random condition), in table order
PAIRS = [
    ("paper: drop", "paper", "no-divergence", "random-matched"),
    ("ratio: drop", "ratio", "ratio-no-divergence", "ratio-random-matched"),
    ("likelihood shift: drop", "likelihood-shift", "shift-no-divergence", "shift-random-matched"),
    ("gradient: drop", "gradient", "gradient-no-divergence", "gradient-random-matched"),
    ("paper: replace-random", "paper", "replace-divergence", "replace-random-matched"),
    ("paper: corrupt-input", "paper", "corrupt-divergence", "corrupt-random-matched"),
]


def _results(run: Path) -> dict[str, Path]:
    """Base label -> results.json: each base-K directory, or the run itself."""
    found = {m.group(1): p for p in run.glob("base-*/results.json") if (m := re.fullmatch(r"base-(\d+)", p.parent.name))}
    if found:
        return {k: found[k] for k in sorted(found, key=int)}
    if (run / "results.json").is_file():
        return {"-": run / "results.json"}
    raise SubliminalError(f"{run}: no results.json and no base-K/results.json (not a finished run)")


def _values(res: dict[str, Any]) -> dict[str, dict[int, float]]:
    return {c: {int(s): v for s, v in e["by_seed"].items()} for c, e in res["conditions"].items() if e.get("by_seed")}


def _cell(values: dict[str, dict[int, float]], verdicts: dict[str, dict[str, Any]], cond: str
          ) -> dict[str, Any] | None:
    if cond not in values:
        return None
    d = claims.paired_diff(values, cond)
    v = verdicts.get(cond)
    return {"diff": d, "share": None if v is None else v.get("share"), "share_lo": None if v is None else v.get("lo"),
            "share_hi": None if v is None else v.get("hi"), "verdict": None if v is None else v["verdict"]}


def collect(run: Path) -> dict[str, Any]:
    """Per base: the all-tokens transfer, and each pair's flagged and random cells."""
    bases = {}
    for base, path in _results(run).items():
        res = json.loads(path.read_text())
        values = _values(res)
        if "control" not in values or "all" not in values:
            raise SubliminalError(f"{path}: no control and all-tokens students")
        verdicts = claims.all_verdicts(values)
        rows = []
        for label, rule, flagged, random in PAIRS:
            f, r = _cell(values, verdicts, flagged), _cell(values, verdicts, random)
            if f is None and r is None:
                continue
            info = (res.get("rules") or {}).get(rule) or {}
            rows.append({"pair": label, "flagged_condition": flagged, "random_condition": random, "flagged": f,
                         "random": r, "flagged_tokens": info.get("flagged_tokens"), "tokens": info.get("tokens")})
        bases[base] = {"all_minus_control": claims.paired_diff(values, "all"),
                       "transfer_is_real": claims.transfer_is_real(values), "rows": rows, "results": str(path)}
    return {"run": str(run), "bases": bases}


def _share(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    if c["share"] is None:
        d = c["diff"]
        return "n/a" if d is None else f"({d['mean']:+.3f})"
    if c["share_lo"] is None:
        return f"{c['share']:.2f}"
    return f"{c['share']:.2f} [{c['share_lo']:.2f}, {c['share_hi']:.2f}]"


def render(result: dict[str, Any]) -> str:
    bases = result["bases"]
    pairs = list(dict.fromkeys(r["pair"] for b in bases.values() for r in b["rows"]))
    lines = ["Share of the all-tokens transfer kept, flagged tokens / matched random tokens (paired bootstrap 95% "
             "interval over seeds); where the all-tokens transfer is not distinguishable from zero on a base, the "
             "paired difference to the control in brackets instead of a share.", "",
             "| base | all - control | " + " | ".join(pairs) + " |", "|---|---|" + "---|" * len(pairs)]
    for k, b in bases.items():
        a = b["all_minus_control"]
        cells = []
        for p in pairs:
            row = next((r for r in b["rows"] if r["pair"] == p), None)
            cells.append("-" if row is None else f"{_share(row['flagged'])} / {_share(row['random'])}")
        lines.append(f"| {k} | {a['mean']:+.3f} [{a['lo']:+.3f}, {a['hi']:+.3f}] | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(result: dict[str, Any]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["base", "pair", "which", "condition", "diff", "diff_lo", "diff_hi", "share", "share_lo", "share_hi",
                "verdict", "flagged_tokens", "tokens"])
    for k, b in result["bases"].items():
        for r in b["rows"]:
            for which in ("flagged", "random"):
                c = r[which]
                if c is None:
                    continue
                d = c["diff"] or {}
                w.writerow([k, r["pair"], which, r[f"{which}_condition"], d.get("mean"), d.get("lo"), d.get("hi"),
                            c["share"], c["share_lo"], c["share_hi"], c["verdict"], r["flagged_tokens"], r["tokens"]])
    return buf.getvalue()


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bases = result["bases"]
    pairs = list(dict.fromkeys(r["pair"] for b in bases.values() for r in b["rows"]))
    fig, axes = plt.subplots(1, len(pairs), figsize=(2.8 * len(pairs), 3.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], pairs):
        for j, (which, colour) in enumerate((("flagged", "C3"), ("random", "C0"))):
            xs, ys, lo, hi = [], [], [], []
            for i, b in enumerate(bases.values()):
                row = next((r for r in b["rows"] if r["pair"] == p), None)
                c = None if row is None else row[which]
                if c is None or c["share"] is None:
                    continue
                xs.append(i + (j - 0.5) * 0.3)
                ys.append(c["share"])
                lo.append(c["share"] - (c["share_lo"] if c["share_lo"] is not None else c["share"]))
                hi.append((c["share_hi"] if c["share_hi"] is not None else c["share"]) - c["share"])
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=colour, capsize=3, label=f"{which} tokens")
        ax.axhline(1, color="grey", lw=0.8, ls=":")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(bases)), list(bases))
        ax.set_xlabel("base")
        ax.set_title(p, fontsize=9)
    axes[0][0].set_ylabel("share of the all-tokens transfer kept")
    axes[0][0].legend(fontsize=7)
    write_figure_atomic(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished run or across-bases run with detector conditions")
    p.add_argument("--out", required=True, help="output directory")
    args = p.parse_args(argv)
    return guarded(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    run = Path(args.run)
    result = collect(run)
    if not any(b["rows"] for b in result["bases"].values()):
        raise SubliminalError(f"{run}: none of the detector or intervention conditions ran "
                              f"({', '.join(c for _, _, f, r in PAIRS for c in (f, r))})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "detector_bases.json", result)
    write_text_atomic(out / "detector_bases.csv", table_csv(result))
    write_text_atomic(out / "detector_bases.md", render(result))
    plot(result, out / "detector_bases.png")
    write_manifest(out, stage="detector-bases-figure", config={"run": str(run)}, seed=None,
                   inputs={f"base-{k}": Path(b["results"]) for k, b in result["bases"].items()})
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
