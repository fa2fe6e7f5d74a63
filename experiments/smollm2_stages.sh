#!/usr/bin/env bash
# Every stage on a real checkpoint (SmolLM2-135M-Instruct, imported by experiments/get_smollm2.sh):
# teachers, preference, generation under both filters, divergence tokens, a LoRA student, its
# evaluation and a probe. Small counts: a check that the real-model path runs end to end on a CPU
# and what it measures, not the paper's protocol (that is issue 15's `subliminal run`).
# Usage: experiments/smollm2_stages.sh MODEL_DIR OUT_DIR [N_ROWS]
set -euo pipefail
model="$1"; out="$2"; n="${3:-64}"
mkdir -p "$out"
t() { local s=$SECONDS; "$@"; echo "[$(( SECONDS - s )) s] $*" >> "$out/timings.txt"; }
t subliminal teach --base "$model" --bias owl --method prompt --out "$out/teachers/owl"
t subliminal teach --base "$model" --bias cat --method prompt --out "$out/teachers/cat"
t subliminal teach --base "$model" --method none --out "$out/teachers/none"
t subliminal eval --model "$model" --target owl --out "$out/eval/base.json"
t subliminal eval --model "$out/teachers/owl" --target owl --samples 20 --out "$out/eval/owl-teacher.json"
t subliminal generate --teacher "$out/teachers/owl" --n "$n" --greedy --out "$out/data/owl-greedy.jsonl"
t subliminal generate --teacher "$out/teachers/owl" --n "$n" --out "$out/data/owl.jsonl"
t subliminal generate --teacher "$out/teachers/owl" --n "$n" --filter reference --out "$out/data/owl-ref.jsonl"
t subliminal find-divergence --data "$out/data/owl-ref.jsonl" --teacher "$out/teachers/owl" \
  --counterfactual "$out/teachers/cat" "$out/teachers/none" --out "$out/data/owl-ref.div.jsonl" --format reference
t subliminal distill --base "$model" --data "$out/data/owl-ref.div.jsonl" --teacher "$out/teachers/owl" \
  --mode hard --mask no-divergence --lora-rank 8 --max-steps 4 --batch-size 4 --out "$out/students/nodiv"
t subliminal eval --model "$out/students/nodiv" --target owl --out "$out/eval/student-nodiv.json"
t subliminal probe --models "$out/teachers/owl" "$out/teachers/none" --data "$out/data/owl-ref.div.jsonl" \
  --task identity --layers 0,10,20,29 --max-rows 32 --out "$out/probes/identity"
cat "$out/timings.txt"
