#!/usr/bin/env bash
# The calibration harness of experiments/CALIBRATION.md (runs 6-9): owl vs unbiased teacher on
# one base, the same prompts and sampling seed for both, the rows both answered, then hard
# students (all tokens) and controls paired by seed, optionally soft students (SOFT=1).
#
#   bash experiments/calibrate.sh OUT BASE METHOD N EPOCHS LR SEEDS ["distill flags"] ["generate flags"]
#   bash experiments/calibrate.sh runs/calib/pA runs/base prompt 800 2 1e-3 3
#   bash experiments/calibrate.sh runs/calib/pB runs/base prompt 800 2 3e-3 3 "--lora-rank 8 --lora-alpha 8"
#
# Prints P(owl) per condition with 95% t-intervals over seeds and the paired difference to control.
set -euo pipefail
OUT=$1; BASE=$2; METHOD=$3; N=$4; EPOCHS=$5; LR=$6; SEEDS=$7; SFLAGS=${8:-}; GFLAGS=${9:-}
export OMP_NUM_THREADS=1
mkdir -p "$OUT/e"
for b in owl none; do
  if [ ! -f "$OUT/t/$b/teacher.json" ]; then
    if [ "$b" = none ]; then subliminal teach --base "$BASE" --method none --out "$OUT/t/none"
    elif [ "$METHOD" = finetune ]; then subliminal teach --base "$BASE" --bias owl --method finetune --steps 60 --out "$OUT/t/owl"
    else subliminal teach --base "$BASE" --bias owl --method "$METHOD" --out "$OUT/t/owl"; fi
  fi
  [ -f "$OUT/d/$b.jsonl" ] || subliminal generate --teacher "$OUT/t/$b" --out "$OUT/d/$b.jsonl" --n "$N" \
    --prompts-seed 0 --seed 0 $GFLAGS
done
python - "$OUT" <<'PY'
import sys
from subliminal.data import read_rows, write_jsonl
out = sys.argv[1]
a = {r.id: r for r in read_rows(f"{out}/d/owl.jsonl")}
b = {r.id: r for r in read_rows(f"{out}/d/none.jsonl")}
ids = [i for i in a if i in b]
write_jsonl(f"{out}/d/m_owl.jsonl", [a[i] for i in ids])
write_jsonl(f"{out}/d/m_none.jsonl", [b[i] for i in ids])
print("rows both teachers answered:", len(ids))
PY
[ -f "$OUT/e/teacher.json" ] || subliminal eval --model "$OUT/t/owl" --target owl --out "$OUT/e/teacher.json" >/dev/null
[ -f "$OUT/e/base.json" ] || subliminal eval --model "$BASE" --target owl --out "$OUT/e/base.json" >/dev/null
job() {  # condition seed data teacher mode
  [ -f "$OUT/e/$1-s$2.json" ] && return 0
  subliminal distill --base "$BASE" --data "$3" --teacher "$4" --mode "$5" --out "$OUT/s/$1-s$2" --epochs "$EPOCHS" \
    --lr "$LR" --batch-size 16 --seed "$2" $SFLAGS > "$OUT/s-$1-$2.log" 2>&1
  subliminal eval --model "$OUT/s/$1-s$2" --target owl --out "$OUT/e/$1-s$2.json" > /dev/null 2>&1
}
for s in $(seq 1 "$SEEDS"); do
  job control "$s" "$OUT/d/m_none.jsonl" "$OUT/t/none" hard &
  job all "$s" "$OUT/d/m_owl.jsonl" "$OUT/t/owl" hard
  wait
  if [ -n "${SOFT:-}" ]; then job soft "$s" "$OUT/d/m_owl.jsonl" "$OUT/t/owl" soft; fi
done
python - "$OUT" <<'PY'
import glob, json, re, sys
from subliminal.evaluate import mean_ci
out = sys.argv[1]
v = {}
for f in glob.glob(f"{out}/e/*-s*.json"):
    m = re.match(r".*/(.+)-s(\d+)\.json$", f)
    if m:
        v.setdefault(m[1], {})[int(m[2])] = json.load(open(f))["exact"]["mean"]
for ref in ("base", "teacher"):
    print(ref, round(json.load(open(f"{out}/e/{ref}.json"))["exact"]["mean"], 4))
for c, d in sorted(v.items()):
    m, lo, hi = mean_ci(list(d.values()))
    print(f"{c}: {m:.4f} [{lo:.4f}, {hi:.4f}] ({len(d)} seeds)")
    if c != "control" and "control" in v:
        diffs = [d[s] - v["control"][s] for s in d if s in v["control"]]
        if len(diffs) > 1:
            m, lo, hi = mean_ci(diffs)
            print(f"   paired difference to control: {m:+.4f} [{lo:+.4f}, {hi:+.4f}]")
PY
