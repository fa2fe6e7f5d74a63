"""subliminal-lens: the mechanistic study of subliminal transfer.

Stages (toy pretraining, teachers, generation, divergence scoring, distillation, evaluation,
probes) talk through directories on disk, each with a ``manifest.json``; see DESIGN.md.
"""

__version__ = "0.1.0"
