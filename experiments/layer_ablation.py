#!/usr/bin/env python
"""Layer ablation: which single layer, fine-tuned alone, carries subliminal transfer?

For every layer in the config (or ``--layers``), and for each mode (LoRA r=8 on that layer's
projections; full fine-tuning of that layer), a student is distilled from the teacher's data
with ``subliminal distill --layers L``, for every seed; each student is scored with
``subliminal eval`` (exact preference for the target). Beside them stand the all-layers
students of the same modes, the base model and the teacher. Transfer per condition is the mean
over seeds with a 95% t-interval (over seeds), also reported as the difference to the base.

Outputs in ``out``: ``students/<cond>-s<seed>/`` (each with its ``eval.json``),
``layer_ablation.json`` / ``.csv`` / ``.png`` and ``manifest.json``. Re-running resumes: a
student whose ``eval.json`` exists is not trained again.

    python experiments/layer_ablation.py --config experiments/layer_ablation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from subliminal.probes.activations import resolve_layers
from subliminal.probes.plots import plot_ablation

from subliminal.cli import guarded
from subliminal.evaluate import mean_ci
from subliminal.manifest import SubliminalError, write_json_atomic, write_manifest

log = logging.getLogger("layer_ablation")
HERE = Path(__file__).resolve().parent
DEFAULTS: dict[str, Any] = {
    "layers": "all",
    "include_all_layers": True,
    "seeds": [0, 1, 2],
    "modes": {"lora": ["--lora-rank", "8", "--lora-alpha", "8"], "full": []},
    "distill_args": ["--mode", "soft", "--mask", "all"],
    "eval_args": [],
    "runtime": ["--device", "auto"],
    # "subliminal ..." runs in this process; anything else (e.g. ["{python}", "my_distill.py"]) as a subprocess
    "distill_command": ["subliminal", "distill"],
    "eval_command": ["subliminal", "eval"],
}
REQUIRED = ("base", "teacher", "data", "target", "out")


def load_config(path: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise SubliminalError(f"{p}: no such config file") from None
    except json.JSONDecodeError as e:
        raise SubliminalError(f"{p}:{e.lineno}: malformed JSON ({e.msg})") from None
    cfg = {**DEFAULTS, **{k: v for k, v in cfg.items() if not k.startswith("_")},
           **{k: v for k, v in overrides.items() if v is not None}}
    missing = [k for k in REQUIRED if not cfg.get(k)]
    if missing:
        raise SubliminalError(f"{p}: missing {', '.join(missing)}")
    if not isinstance(cfg["modes"], dict) or not cfg["modes"]:
        raise SubliminalError(f"{p}: 'modes' must map a name to extra distill arguments")
    return cfg


def n_layers(base: str) -> int:
    cfg_path = Path(base) / "config.json"
    if not cfg_path.is_file():
        raise SubliminalError(f"{base}: no config.json (the base model directory)")
    cfg = json.loads(cfg_path.read_text())
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise SubliminalError(f"{cfg_path}: no layer count")


def conditions(cfg: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """``(name, layers, mode)``: one per chosen layer and mode, then the all-layers students."""
    lays = resolve_layers(cfg["layers"] if isinstance(cfg["layers"], str) else list(cfg["layers"]),
                          n_layers(cfg["base"]))
    out = [(f"L{layer}-{mode}", layer, mode) for layer in lays for mode in cfg["modes"]]
    if cfg["include_all_layers"]:
        out += [(f"all-{mode}", "all", mode) for mode in cfg["modes"]]
    return out


def _cmd(template: list[str]) -> list[str]:
    return [sys.executable if x == "{python}" else x for x in template]


def run(cmd: list[str], dry: bool) -> None:
    log.info("$ %s", " ".join(cmd))
    if dry:
        return
    if cmd[0] == "subliminal":  # in process: no second start-up of torch per student
        from subliminal.cli import main as cli_main

        rc = cli_main(cmd[1:])
    else:
        rc = subprocess.run(cmd).returncode
    if rc != 0:
        raise SubliminalError(f"command failed with exit code {rc}: {' '.join(cmd)}")


def eval_model(cfg: dict[str, Any], model: str, out_json: Path, dry: bool) -> float | None:
    if not out_json.is_file():
        run(_cmd(cfg["eval_command"]) + ["--model", model, "--target", cfg["target"], "--out", str(out_json)]
            + list(cfg["eval_args"]) + list(cfg["runtime"]), dry)
    if dry:
        return None
    return float(json.loads(out_json.read_text())["exact"]["mean"])


def train_and_eval(cfg: dict[str, Any], name: str, layers: Any, mode: str, seed: int, dry: bool) -> float | None:
    student = Path(cfg["out"]) / "students" / f"{name}-s{seed}"
    ev = student / "eval.json"
    if not ev.is_file():
        cmd = _cmd(cfg["distill_command"]) + ["--base", cfg["base"], "--data", cfg["data"],
                                              "--teacher", cfg["teacher"], "--out", str(student),
                                              "--seed", str(seed)]
        if layers != "all":
            cmd += ["--layers", str(layers)]
        run(cmd + list(cfg["modes"][mode]) + list(cfg["distill_args"]) + list(cfg["runtime"]), dry)
    return eval_model(cfg, str(student), ev, dry)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(HERE / "layer_ablation.json"))
    ap.add_argument("--out", help="override the config's output directory")
    ap.add_argument("--layers", help="override the config's layers ('all', '0,2', '0-3')")
    ap.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return guarded(_main, args)  # the commands' own error boundary


def _main(args: argparse.Namespace) -> int:
    t0 = time.time()
    cfg = load_config(args.config, {"out": args.out, "layers": args.layers, "seeds": args.seeds})
    out = Path(cfg["out"])
    conds = conditions(cfg)
    base = eval_model(cfg, cfg["base"], out / "base.eval.json", args.dry_run)
    teacher = eval_model(cfg, cfg["teacher"], out / "teacher.eval.json", args.dry_run)
    results = []
    for name, layers, mode in conds:
        per_seed = [train_and_eval(cfg, name, layers, mode, s, args.dry_run) for s in cfg["seeds"]]
        if args.dry_run:
            continue
        m, lo, hi = mean_ci(per_seed)
        results.append({"name": name, "layers": layers, "mode": mode, "transfer": m, "ci": [lo, hi],
                        "delta_vs_base": m - base, "per_seed": per_seed, "seeds": cfg["seeds"]})
        log.info("%-12s P(%s) = %.4f [%.4f, %.4f]  (base %.4f)", name, cfg["target"], m, lo, hi, base)
    if args.dry_run:
        return 0
    table = {"target": cfg["target"], "metric": f"exact P({cfg['target']})", "base": base, "teacher": teacher,
             "interval": "95% t-interval over seeds", "results": results}
    write_json_atomic(out / "layer_ablation.json", table)
    plot_ablation(table, out / "layer_ablation.png")
    write_manifest(out, stage="layer_ablation", config=cfg, seed=None,
                   inputs={"base": cfg["base"], "teacher": cfg["teacher"], "data": cfg["data"]},
                   wall_time_s=time.time() - t0)
    print(out / "layer_ablation.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
