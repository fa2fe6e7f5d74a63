"""Each transfer diagnostic against the measured transfer, pooled over the bases of several
robustness runs (e.g. two toy worlds), with Spearman's rho and its bootstrap interval.

    python experiments/diagnostics_pooled.py RUN_DIR [RUN_DIR ...] [--out pooled.json]

Every RUN_DIR is the output of ``subliminal run CONFIG --base-seeds ...`` (its ``robustness.json``);
a base is one point, named ``RUN_DIR:base``. Besides rho, the teacher's transfer as a share of the
true-trait-holder link per base, where the holder conditions ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from subliminal.manifest import write_json_atomic
from subliminal.robustness import DIAGNOSTICS, spearman_ci

HOLDER = "true-holder link (students)"


def pooled(run_dirs: list[Path]) -> dict:
    points = []
    for d in run_dirs:
        result = json.loads((d / "robustness.json").read_text())
        for p in result["diagnostics"]["points"]:
            points.append({**p, "run": d.name})
    out: dict = {"runs": [str(d) for d in run_dirs], "points": points, "spearman": {}}
    for name, _ in DIAGNOSTICS:
        out["spearman"][name] = spearman_ci([p.get(name) for p in points], [p["transfer"] for p in points])
    out["teacher_share_of_link"] = {f"{p['run']}:{p['base']}": p["transfer"] / p[HOLDER]
                                    for p in points if p.get(HOLDER)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    missing = [str(d) for d in args.runs if not (d / "robustness.json").is_file()]
    if missing:
        print(f"no robustness.json in {', '.join(missing)} (the output of `subliminal run ... --base-seeds`)",
              file=sys.stderr)
        return 2
    res = pooled(args.runs)
    for name, sp in res["spearman"].items():
        rho = "n/a" if sp["rho"] is None else f"{sp['rho']:+.2f} [{sp['lo']:+.2f}, {sp['hi']:+.2f}]"
        print(f"{name:35s} n={sp['n']:2d}  rho {rho}")
    for k, v in res["teacher_share_of_link"].items():
        print(f"{k:20s} teacher transfer / holder link {v:.2f}")
    if args.out:
        write_json_atomic(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
