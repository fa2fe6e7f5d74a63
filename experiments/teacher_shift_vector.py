#!/usr/bin/env python
"""A steering vector from a fine-tuned teacher: its mean residual shift from its base at one block.

A love prompt's shift (``teach --method steer``'s own vector) carries only what the prompt does;
on SmolLM2-135M-Instruct the owl prompt itself moves P(owl) only to ~0.14, and its vector at block
15 gives no owl teacher at any alpha. A teacher fine-tuned on the preference questions holds the
trait in its weights; the mean difference of its block-``L`` output and its base's, at the last
prompt position of the vector split of the preference questions (the site and prompts
``teach --method steer`` measures on, :func:`subliminal.steer.prompt_texts`), is a direction
that trait may live along. ``teach --method steer --steer-vector OUT`` then makes a teacher that adds
alpha times it, with no weights changed.

    python experiments/teacher_shift_vector.py --base B --teacher runs/teachers/owl --layer 25 \\
        --out runs/vectors/owl-lora-25.safetensors
    subliminal teach --base B --bias owl --method steer --steer-layer 25 --steer-alpha 1 \\
        --steer-vector runs/vectors/owl-lora-25.safetensors --out runs/teachers/owl-steer
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from subliminal.cli import guarded
from subliminal.manifest import write_file_manifest, write_json_atomic
from subliminal.models import load_model, load_tokenizer
from subliminal.steer import check_layer, last_residuals, prompt_texts, save_vector, vector_info_path


def teacher_shift(base: str, teacher: str, layer: int, *, source: str = "questions", batch_size: int = 16,
                  device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean over the prompts of teacher minus base, block ``layer``'s output, last prompt position."""
    tok = load_tokenizer(base)
    texts = prompt_texts(tok, source, split="vector")

    def acts(spec: str) -> torch.Tensor:
        model = load_model(spec, device=device).model
        check_layer(model, layer, "--layer")
        return last_residuals(model, tok, texts, layers=[layer], batch_size=batch_size)[:, 0]

    b, t = acts(base), acts(teacher)
    v = (t - b).mean(0)
    return v, {"kind": "teacher shift", "base": base, "teacher": teacher, "layer": layer, "source": source,
               "n_prompts": len(texts), "norm": v.norm().item(), "resid_norm": b.norm(dim=-1).mean().item()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="the teacher's base model directory")
    p.add_argument("--teacher", required=True, help="a teacher directory (fine-tuned or LoRA) of that base")
    p.add_argument("--layer", type=int, required=True, help="block whose output is read (blocks.L.hook_resid_post)")
    p.add_argument("--source", choices=("questions", "numbers"), default="questions")
    p.add_argument("--out", required=True, help="the vector (.safetensors); its description beside it")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    def go() -> int:
        v, info = teacher_shift(args.base, args.teacher, args.layer, source=args.source, device=args.device)
        save_vector(args.out, v)
        write_json_atomic(vector_info_path(args.out), info)
        write_file_manifest(args.out, stage="teacher-shift-vector", config=vars(args), seed=None,
                            inputs={"base": args.base, "teacher": args.teacher}, extra={"summary": info})
        print(f"|v| {info['norm']:.3f} (mean residual norm {info['resid_norm']:.3f}) -> {Path(args.out)}")
        return 0

    return guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
