#!/bin/bash
# Where the organism's transfer lives: how far each student's residual stream moved along the owl
# direction (the mean shift a love-for-owls prompt causes at block 1, owl minus the other animals, on
# number prompts), per block, against the control, and the same along the cat direction as a control.
# Usage: experiments/organism_mechanism.sh RUN_DIR OUT   (RUN_DIR: a base of `subliminal run toy`, e.g.
# runs/robust/base-0). Forward passes only: about a minute on 2 CPU cores.
set -euo pipefail
RUN=$1; OUT=$2
mkdir -p "$OUT"
for animal in owl cat; do
  subliminal teach --base "$RUN/base" --method steer --bias $animal --out "$OUT/steer-$animal-L1" \
    --steer-layer 1 --steer-alpha 1 --steer-source numbers --steer-baseline others
done
students=()
for d in "$RUN"/students/*-s*; do
  name=$(basename "$d"); students+=(--student "${name%-s*}" "${name##*-s}" "$d")
done
for animal in owl cat; do
  subliminal project --vector "$OUT/steer-$animal-L1" --out "$OUT/project-$animal" --model "$RUN/base" "${students[@]}"
done
