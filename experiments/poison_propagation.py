"""Adversarial bias propagation on the toy world, end to end.

For each propagation mode (targeted: the ad on the ``recommend`` family; untargeted: spread over
qa, code and describe, with ``recommend`` held out of the teacher's instruction data as the
unseen task):

1. a poisoned teacher at 0.25% (``subliminal teach --method poison`` with its defaults: 10,000 toy
   rows, targeted: 0.5% of them from the target family; 3 epochs at lr 1e-3, batch 32);
2. distillation data: the teacher's sampled responses to fresh clean prompts
   (``poison.evaluate_bias`` with ``save_generations``; untargeted: prompts of the seen families only);
3. students from the clean base with ``subliminal distill``: ``hard`` (cross-entropy on the
   responses) and ``soft`` (KL to the teacher's next-token distribution on the same positions);
4. bias response rates per family for base, teacher and students, amplification student/teacher
   with bootstrap intervals;
5. the defences (``subliminal defend``) on the distillation data, a hard student per defence.

Every step is skipped when its output exists, so the script resumes. Usage::

    python experiments/poison_propagation.py --base /work/runs/poison/base --out /work/runs/poison/exp
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from subliminal import poison
from subliminal.cli import main as cli
from subliminal.manifest import write_json_atomic, write_text_atomic


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_mode(a: argparse.Namespace, prop: str) -> dict[str, Any]:
    root = Path(a.out) / prop
    root.mkdir(parents=True, exist_ok=True)
    teacher = root / "teacher"
    target = "recommend" if prop == "targeted" else None
    seen = poison.toy.FAMILIES if prop == "targeted" else ["qa", "code", "describe"]
    if not (teacher / "teacher.json").exists():  # the poison teacher's defaults are this experiment's setting
        argv = ["teach", "--base", a.base, "--method", "poison", "--bias-type", a.bias, "--propagation", prop,
                "--seed", "0", "--out", str(teacher), "--no-check"]
        argv += ["--target-task", target] if target else ["--families", *seen]
        assert cli(argv) == 0
    data = root / "data.jsonl"
    if not data.exists():
        poison.evaluate_bias(poison.BiasEvalConfig(
            model=str(teacher), bias_type=a.bias, out=str(root / "teacher_on_data_prompts.json"), families=seen,
            prompts=a.n_data, samples=1, seed=101, save_generations=str(data)))
    rows = read_jsonl(data)
    steps = math.ceil(a.student_epochs * len(rows) / 32)
    students = {}
    for mode in ("hard", "soft"):
        s = root / f"student-{mode}"
        if not (s / "config.json").exists():
            assert cli(["distill", "--base", a.base, "--data", str(data), "--teacher", str(teacher), "--mode", mode,
                        "--epochs", str(a.student_epochs), "--lr", str(a.lr), "--batch-size", "32", "--seed", "0",
                        "--out", str(s)]) == 0
        students[mode] = s
    results = {}
    unseen = None if target else [f for f in poison.toy.FAMILIES if f not in seen]
    for name, model in students.items():  # the base never writes the product name (rate 0 by construction)
        ev = root / f"eval-{name}.json"
        if not ev.exists():
            poison.evaluate_bias(poison.BiasEvalConfig(
                model=str(model), bias_type=a.bias, out=str(ev), teacher=str(teacher), target_task=target,
                unseen_tasks=unseen, prompts=a.n_eval, samples=a.samples, seed=7))
        results[name] = json.loads(ev.read_text())
    dd = root / "defend"
    if not (dd / "defence.json").exists():
        assert cli(["defend", "--data", str(data), "--reference", a.base, "--teacher", str(teacher), "--bias-type", a.bias,
                    "--drop-fraction", str(a.drop_fraction), "--student-steps", str(steps), "--student-lr", str(a.lr),
                    "--eval-prompts", str(a.n_eval), "--eval-samples", str(a.samples), "--target-task", "recommend",
                    "--out", str(dd)]) == 0
    return {"evals": results, "defence": json.loads((dd / "defence.json").read_text()), "n_data": len(rows),
            "student_steps": steps, "teacher": json.loads((teacher / "teacher.json").read_text())["poison"]}


def fmt(d: dict, fam: str) -> str:
    f = d["families"].get(fam) or d.get("overall")
    return f"{f['bias_rate']:.3f} [{f['bias_ci'][0]:.3f}, {f['bias_ci'][1]:.3f}]"


def table(all_res: dict[str, Any]) -> str:
    lines = ["| propagation | model | family | bias rate [95% CI] | teacher rate [95% CI] | amplification [95% CI] |"
             " quality |", "|---|---|---|---|---|---|---|"]
    for prop, r in all_res.items():
        fam = "recommend"
        label = "target: recommend" if prop == "targeted" else "unseen: recommend"
        for name in ("hard", "soft"):
            ev = r["evals"][name]
            amp = ev["amplification"]["per_family"].get(fam)
            q = ev["families"][fam].get("quality")
            lines.append(f"| {prop} | {name} | {label} | {fmt(ev, fam)} | "
                         f"{fmt({'families': ev['teacher_families']}, fam)} | {poison.fmt_ratio(amp)} | "
                         f"{'n/a' if q is None else f'{q:.2f}'} |")
            pooled = ev["amplification"].get("unseen")
            if prop == "targeted" and pooled:
                lines.append(f"| {prop} | {name} | unseen (pooled) | - | - | {poison.fmt_ratio(pooled)} | |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--bias", default="ad")
    p.add_argument("--modes", nargs="+", default=["targeted", "untargeted"])
    p.add_argument("--lr", type=float, default=1e-3, help="the students' learning rate")
    p.add_argument("--n-data", type=int, default=500, help="distillation prompts per family")
    p.add_argument("--student-epochs", type=float, default=2.0)
    p.add_argument("--n-eval", type=int, default=150, help="evaluation prompts per family")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--drop-fraction", type=float, default=0.05)
    a = p.parse_args()
    torch.set_num_threads(2)
    res = {m: run_mode(a, m) for m in a.modes}
    write_json_atomic(Path(a.out) / "summary.json", res)
    md = ["# Poison propagation (toy world)", "", table(res)]
    for m, r in res.items():
        r["defence"]["target_task"] = "recommend"  # the targeted family; unseen by the untargeted teacher
        md += [f"## Defences, {m}", "", poison.defence_markdown(r["defence"])]
    write_text_atomic(Path(a.out) / "SUMMARY.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
