#!/usr/bin/env python
"""Share sweep for every detector: the transfer kept when the top S of tokens by each detector is
dropped from the loss (and its matched random control), S from 1% to 20%.

Runs ``experiments/detector_table.py --interventions drop`` once per share (its students resume),
then writes ``sweep.csv`` and ``sweep.png`` in ``--out``; ``--include`` adds tables already
made at other shares (e.g. the full 10% table).

    python experiments/detector_sweep.py --run /work/exp/rob2/base-2 --out experiments/results/detectors/sweep \
        --work-root /tmp/det --shares 0.01 0.02 0.05 0.2 --seeds 1 2 4 5 \
        --include experiments/results/detectors/detector_table.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import detector_table  # noqa: E402  (the script beside this one)

from subliminal.manifest import write_figure_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work-root", required=True, help="work directories work-SHARE go here")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 4, 5])
    ap.add_argument("--detector-seed", type=int, default=3)
    ap.add_argument("--include", nargs="*", default=[], help="detector_table.json files of other shares")
    args = ap.parse_args(argv)
    out = Path(args.out)
    tables = [Path(p) for p in args.include]
    for s in args.shares:
        d = out / f"share-{s:g}"
        rc = detector_table.main(["--run", args.run, "--out", str(d), "--work", str(Path(args.work_root) / f"work-{s:g}"),
                                  "--share", str(s), "--seeds", *map(str, args.seeds), "--detector-seed",
                                  str(args.detector_seed), "--interventions", "drop"])
        if rc:
            return rc
        tables.append(d / "detector_table.json")
    rows: list[dict[str, Any]] = []
    for t in tables:
        res = json.loads(t.read_text())
        for r in res["rows"]:
            if r["intervention"] == "drop":
                rows.append({"share": res["share"], **{k: r[k] for k in ("detector", "tokens", "changed_tokens",
                                                                           "share_kept", "kept_lo", "kept_hi",
                                                                           "diff_to_control")}})
    rows.sort(key=lambda r: (r["detector"], r["tokens"], r["share"]))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    _figure(rows, out / "sweep.png")
    for r in rows:
        print(f"{r['detector']:17s} {r['tokens']:8s} {r['share']:5.2f} kept {r['share_kept']:.2f} "
              f"[{r['kept_lo']:.2f}, {r['kept_hi']:.2f}]")
    return 0


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, d in enumerate(dict.fromkeys(r["detector"] for r in rows)):
        for on, style in (("flagged", "-o"), ("random", ":x")):
            sel = [r for r in rows if r["detector"] == d and r["tokens"] == on and r["share_kept"] is not None]
            if not sel:
                continue
            x = [100 * r["share"] for r in sel]
            ax.plot(x, [r["share_kept"] for r in sel], style, color=f"C{i}", label=f"{d}, {on} tokens dropped")
            ax.fill_between(x, [r["kept_lo"] for r in sel], [r["kept_hi"] for r in sel], color=f"C{i}",
                            alpha=0.12 if on == "flagged" else 0.05)
    ax.axhline(1, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens dropped from the loss (% of completion tokens)")
    ax.set_ylabel("share of the all-tokens transfer kept")
    ax.legend(fontsize=7)
    write_figure_atomic(fig, path)


if __name__ == "__main__":
    sys.exit(main())
