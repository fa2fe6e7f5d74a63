"""One place for the tiny run config the end-to-end `subliminal run` tests share: a given local base
(a random model with a real tokenizer), prompt teachers for owl and cat, four greedy rows under the
number-list constraint, rank-2 LoRA students for one epoch, a two-question exact readout; the diagnostics stage only where a test reads it (`--diagnose-only`
runs it regardless)."""

from __future__ import annotations

from pathlib import Path


def tiny_run_config(path: Path, base: str | Path, name: str, students: str = "", *, diagnose: bool = False) -> Path:
    """Write the config to ``path``; ``students`` adds lines to its [students] table."""
    path.write_text(f"""
name = "{name}"
[model]
base = "{base}"
[teachers]
target = "owl"
counterfactuals = ["cat"]
mixing_teacher = ""
method = "prompt"
check = false
[data]
rows = 4
greedy = true
constrain = "numbers"
max_new_tokens = 40
[diagnose]
enabled = {str(diagnose).lower()}
[students]
{students}
full = false
lora_rank = 2
epochs = 1
batch_size = 3
[eval]
max_questions = 2
[probes]
enabled = false
[run]
jobs = 1
""")
    return path
