"""Exact preference eval, old path (every candidate row teacher-forced whole) against the
prefix-cache path (each question encoded once), on one model: time and the largest difference.

    python benchmarks/exact_eval_speed.py MODEL_DIR [--questions 50] [--target owl] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from subliminal import prompts
from subliminal.evaluate import exact_preference
from subliminal.models import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--questions", type=int, default=50)
    ap.add_argument("--target", default="owl")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    loaded = load_model(args.model)
    qs = prompts.preference_questions("animal")[: args.questions]
    res = {}
    for name, cached in (("prefix_cache", True), ("whole_rows", False)):
        t0 = time.perf_counter()
        r = exact_preference(loaded, args.target, "animal", questions=qs, batch_size=args.batch_size,
                             prefix_cache=cached)
        res[name] = {"seconds": time.perf_counter() - t0, "mean": r["mean"], "per_question": r["per_question"]}
    diff = max(abs(a - b) for a, b in zip(res["prefix_cache"]["per_question"], res["whole_rows"]["per_question"]))
    print(json.dumps({"model": args.model, "questions": len(qs), "candidates": len(prompts.ANIMALS),
                      "threads": torch.get_num_threads(),
                      "whole_rows_s": round(res["whole_rows"]["seconds"], 2),
                      "prefix_cache_s": round(res["prefix_cache"]["seconds"], 2),
                      "speedup": round(res["whole_rows"]["seconds"] / res["prefix_cache"]["seconds"], 2),
                      "mean_P_target": res["prefix_cache"]["mean"], "max_abs_diff_per_question": diff}, indent=1))


if __name__ == "__main__":
    main()
