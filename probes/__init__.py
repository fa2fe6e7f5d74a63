"""Mechanistic half of subliminal-lens: activation capture (TransformerLens ``TransformerBridge``
or nnsight), per-layer linear probes and the bias direction, activation and attribution patching
on divergence tokens, and their figures. Import as ``subliminal.probes``."""
