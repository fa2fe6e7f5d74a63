"""subliminal-lens: the mechanistic study of subliminal transfer.

Stages (toy pretraining, teachers, generation, divergence scoring, distillation, evaluation,
probes) talk through directories on disk, each with a ``manifest.json``; see DESIGN.md.
"""

import sys as _sys
from pathlib import Path as _Path

__version__ = "0.1.0"

# A source checkout's top-level folder kernels/ (installed as subliminal.kernels) shadows the hub
# package `kernels` that transformers imports when Python puts the checkout's root on sys.path:
# `python -m ...` run from the repository root, which is how torchrun starts every rank. The
# project is installed, so the root is never needed on the path; take it off before transformers
# is imported.
_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "kernels" / "_checks.py").is_file() and (_ROOT / "pyproject.toml").is_file():
    _sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _ROOT]
    _shadow = _sys.modules.get("kernels")
    if _shadow is not None and _ROOT in _Path(getattr(_shadow, "__file__", None) or "/").resolve().parents:
        del _sys.modules["kernels"]
