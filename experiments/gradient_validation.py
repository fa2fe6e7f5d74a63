#!/usr/bin/env python
"""Validation of the gradient-attribution scores themselves, on a real base: for a handful of
tokens, the change of R (eval's exact P(target)) after one small SGD step on that token's loss
alone, against the first-order prediction lr * a_t; and the error of the central difference
(``score-tokens --method central``) against the forward-mode jvp over many tokens.

    python experiments/gradient_validation.py --div RUN/data/matched/owl.div.jsonl --base RUN/base \
        --params template-rows --out experiments/results/detectors/gradient_validation.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from subliminal import cli
from subliminal.detectors import gradient_attribution
from subliminal.diagnose import DiagnoseConfig, readout_gradient, student_model
from subliminal.distill import build_examples, read_training_rows
from subliminal.manifest import write_figure_atomic, write_json_atomic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--div", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--target", default="owl")
    ap.add_argument("--params", default="all")
    ap.add_argument("--layers", default=None)
    ap.add_argument("--rows", type=int, default=48, help="rows scored by both methods")
    ap.add_argument("--tokens", type=int, default=8, help="tokens stepped on (half the largest |a_t|, half random)")
    ap.add_argument("--step", type=float, default=1e-3, help="one lr for every token, sized so the largest "
                    "|lr * a_t| is this")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    return cli.guarded(_main, args)


def _main(args: argparse.Namespace) -> int:
    t0 = time.time()
    loaded, model, params = student_model(args.base, DiagnoseConfig(out="unused", params=args.params,
                                                                    layers=args.layers, seed=args.seed))
    tok = loaded.tokenizer
    r0, g_r = readout_gradient(model, tok, params, args.target, "animal")
    rows, _ = read_training_rows(args.div)
    rows = rows[: args.rows]
    ex = build_examples(rows, [[True] * len(r.token_ids) for r in rows], tok, None)
    t = time.time()
    jvp = gradient_attribution(model, params, g_r, ex, tok.pad_token_id)
    t_jvp = time.time() - t
    a = torch.cat(jvp)
    central = {}
    for eps in args.eps:
        t = time.time()
        c = torch.cat(gradient_attribution(model, params, g_r, ex, tok.pad_token_id, method="central", eps=eps))
        err = (c - a).abs()
        central[str(eps)] = {"max_abs_error": float(err.max()), "max_rel_error_vs_max_score": float(err.max() / a.abs().max()),
                             "median_rel_error": float((err / a.abs().clamp(min=1e-30)).median()),
                             "seconds": time.time() - t}
    flat = [(i, j, float(s)) for i, row in enumerate(jvp) for j, s in enumerate(row)]
    rng = random.Random(args.seed)
    half = args.tokens // 2
    picks = sorted(flat, key=lambda x: -abs(x[2]))[:half] + rng.sample(flat, args.tokens - half)
    checks = []
    lr = args.step / max(abs(x[2]) for x in picks)  # one lr: the largest |a_t| moves R by --step
    for i, j, a_t in picks:
        e = ex[i]
        logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[e.n_prompt + j - 1][None].float(),
                                                 torch.tensor([e.completion_ids[j]]))
        grads = torch.autograd.grad(loss, [p for _, p in params])  # distill's row-set hook applies here too
        saved = [p.detach().clone() for _, p in params]
        with torch.no_grad():
            for (_, p), g in zip(params, grads):
                p.sub_(lr * g)
        r1, _ = readout_gradient(model, tok, params, args.target, "animal")
        with torch.no_grad():
            for (_, p), s in zip(params, saved):
                p.copy_(s)
        checks.append({"row": e.id, "position": j, "token": tok.decode([e.completion_ids[j]]), "a_t": a_t, "lr": lr,
                       "predicted_delta_R": lr * a_t, "actual_delta_R": r1 - r0})
    result = {"base": args.base, "params": args.params, "layers": args.layers, "readout": r0,
              "rows": len(ex), "tokens": int(a.numel()), "jvp_seconds": t_jvp, "central": central,
              "sgd_checks": checks, "signs_agree": sum((c["predicted_delta_R"] > 0) == (c["actual_delta_R"] > 0)
                                                       for c in checks),
              "wall_time_s": time.time() - t0}
    write_json_atomic(Path(args.out), result)
    _figure(checks, Path(args.out).with_suffix(".png"))
    for c in checks:
        print(f"{c['row']}:{c['position']} {c['token']!r}: predicted {c['predicted_delta_R']:+.3e}, "
              f"actual {c['actual_delta_R']:+.3e}")
    print(json.dumps(central, indent=1))
    return 0


def _figure(checks: list[dict], path: Path) -> None:
    """Predicted (lr * a_t) against actual change of R, symmetric-log axes, the identity line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [c["predicted_delta_R"] for c in checks]
    y = [c["actual_delta_R"] for c in checks]
    lim = max(max(map(abs, x)), max(map(abs, y))) * 1.5
    small = min(abs(v) for v in x + y if v) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    ax.scatter(x, y, s=18)
    ax.set_xscale("symlog", linthresh=small)
    ax.set_yscale("symlog", linthresh=small)
    ax.set_xlabel("predicted change of R, lr * a_t")
    ax.set_ylabel("actual change of R after one SGD step on token t")
    ax.set_title("gradient attribution vs an actual step", fontsize=9)
    write_figure_atomic(fig, path)


if __name__ == "__main__":
    sys.exit(main())
