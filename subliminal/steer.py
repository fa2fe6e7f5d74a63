"""Steering-vector teachers: a base model whose bias is a vector added to its residual stream.

Why: a steering teacher's trait has a known direction and a dial for its strength, so a
student's transfer can be read as how far its own residual stream moved along that direction
(``subliminal project``), not only as P(target).

The vector ``v`` lives at one block ``layer`` (the hook ``blocks.{layer}.hook_resid_post``: the
output of decoder layer ``layer``). Measured, it is the mean over prompts of the difference of
the residual at the **last prompt position** (the position that predicts the first answer token,
the site the preference readout reads) between the prompt rendered with the love system prompt
and without one: over the even-indexed preference questions of the bias's category
(``questions``) or over seeded number prompts (``numbers``); the odd-indexed questions and a
number-prompt stream of their own are left for the readout. With ``baseline="others"`` the
baseline is the mean over the love prompts of the category's other candidates instead of no
prompt: a love-prompt-minus-nothing vector also holds what any system prompt does (on a barely
trained toy base the owl and cat vectors of that kind had cosine 0.996). The teacher adds ``alpha * v``, with
``v`` **as measured (or as stored in the user's file), not normalised**, to the output of that
block at every position, through a forward hook: alpha 1 reproduces the prompt's mean shift at
that site. Its norm, ``alpha * |v|`` and the base's mean residual norm at the layer are recorded.

An additive hook on every position is batch-, padding- and process-invariant like the model
itself; :func:`subliminal.models.load_model` attaches it to every model it loads from a steer
teacher directory, so generate, find-divergence, distill (soft labels), eval, probe and patch
all run the steered teacher.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import prompts
from .manifest import SubliminalError, atomic_path

VECTOR_FILE = "steer.safetensors"
VECTOR_KEY = "vector"
SOURCES = ("questions", "numbers")
BASELINES = ("none", "others")
DEFAULT_NUMBER_PROMPTS = 64
SITE = "last prompt position (predicts the first answer token)"

if TYPE_CHECKING:  # torch loads lazily: the CLI imports this module to build its parser
    import torch


class SteerError(SubliminalError):
    pass


# ------------------------------------------------------------------------------- model parts


def n_layers(model: Any) -> int:
    from subliminal.probes.activations import n_layers_of

    return n_layers_of(model)


def width(model: Any) -> int:
    """The residual stream's width: the input embedding's row length."""
    return int(model.get_input_embeddings().weight.shape[1])


def check_layer(model: Any, layer: int, where: str = "--steer-layer") -> None:
    n = n_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise SteerError(f"{where} {layer}: out of range; the model has {n} layers (0..{n - 1})")


def check_vector(vector: torch.Tensor, model: Any, where: str) -> None:
    import torch

    d = width(model)
    if vector.dim() != 1 or vector.numel() != d:
        raise SteerError(f"{where}: a vector of shape {tuple(vector.shape)}, but the model's residual stream "
                         f"has width {d}; give a 1-D vector of {d} numbers measured on this base")
    if not bool(torch.isfinite(vector).all()):
        raise SteerError(f"{where}: the vector holds NaN/inf; re-make it")


# ------------------------------------------------------------------------------- vector files


def save_vector(path: str | Path, vector: torch.Tensor) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({VECTOR_KEY: vector.detach().float().cpu().contiguous()}, str(tmp))


def vector_info_path(path: str | Path) -> Path:
    """Where a vector file's description lies (``v.safetensors`` -> ``v.json``: block, source, bias)."""
    return Path(path).with_suffix(".json")


def load_vector(path: str | Path, where: str = "--steer-vector") -> torch.Tensor:
    """The one tensor of a ``.safetensors`` file (named ``vector``, or the file's only tensor)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise SteerError(f"{where} {path}: no such file; give a .safetensors file holding one 1-D tensor")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise SteerError(f"{where} {path}: not a readable safetensors file ({e}); re-save it with "
                         "safetensors.torch.save_file({'vector': v}, path)") from None
    if VECTOR_KEY in tensors:
        return tensors[VECTOR_KEY].float()
    if len(tensors) != 1:
        raise SteerError(f"{where} {path}: holds {len(tensors)} tensors ({', '.join(sorted(tensors)) or 'none'}); "
                         f"name the steering vector {VECTOR_KEY!r}")
    return next(iter(tensors.values())).float()


# ------------------------------------------------------------------------------------ the hook


def attach(model: Any, vector: torch.Tensor, layer: int, alpha: float) -> Any:
    """Add ``alpha * vector`` to block ``layer``'s output at every position; returns the hook
    handle. The sum is formed in float32 once, then cast to the hidden state's dtype and device
    (cached), so alpha 0 adds an exact zero."""
    from subliminal.probes.activations import find_blocks

    check_layer(model, layer, "steering layer")
    check_vector(vector, model, "steering vector")
    delta = float(alpha) * vector.detach().float().cpu()
    cast: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def hook(_module: Any, _inputs: Any, output: Any) -> Any:
        h = output[0] if isinstance(output, (tuple, list)) else output
        key = (h.dtype, h.device)
        if key not in cast:
            cast[key] = delta.to(dtype=h.dtype, device=h.device)
        new = h + cast[key]
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        if isinstance(output, list):
            return [new] + list(output[1:])
        return new

    return find_blocks(model).__getitem__(layer).register_forward_hook(hook)


def teacher_settings(extra: dict[str, Any], teacher_dir: str | Path) -> dict[str, Any]:
    """The ``steer`` entry of a teacher.json, checked, with the vector path resolved."""
    f = Path(teacher_dir) / "teacher.json"
    s = extra.get("steer")
    if not isinstance(s, dict):
        raise SteerError(f"{f}: method steer needs a 'steer' object (layer, alpha, vector)")
    for key, kind in (("layer", int), ("alpha", (int, float)), ("vector", str)):
        if not isinstance(s.get(key), kind) or isinstance(s.get(key), bool):
            raise SteerError(f"{f}: 'steer.{key}' missing or not a {getattr(kind, '__name__', 'number')}")
    return {**s, "vector": str((Path(teacher_dir) / s["vector"]).resolve())}


def attach_teacher(model: Any, settings: dict[str, Any], teacher_dir: str | Path) -> Any:
    """Attach a steer teacher's hook (``settings`` from :func:`teacher_settings`), naming the
    teacher when its vector or layer does not fit the model."""
    where = f"teacher {teacher_dir}"
    vector = load_vector(settings["vector"], f"{where}: vector")
    try:
        check_layer(model, settings["layer"], f"{where}: steer layer")
        check_vector(vector, model, f"{where}: vector {settings['vector']}")
    except SteerError as e:
        raise SteerError(f"{e} (re-make the teacher with `subliminal teach --method steer`)") from None
    return attach(model, vector, settings["layer"], settings["alpha"])


# -------------------------------------------------------------------------------------- prompts


def prompt_texts(tokenizer: Any, kind: str, *, category: str = "animal", split: str = "vector",
                 n_numbers: int = DEFAULT_NUMBER_PROMPTS, seed: int = 0) -> list[str]:
    """The prompts of one kind as ``tokenizer`` sees them. ``split="vector"``: what a steering
    vector is measured on (even-indexed questions; number prompts of stream ``steer-vector``);
    ``"readout"``: the held-out ones (odd-indexed questions; stream ``steer-readout``)."""
    if split not in ("vector", "readout"):
        raise ValueError(split)
    if kind == "questions":
        qs = prompts.preference_questions(category)
        texts = qs[0::2] if split == "vector" else qs[1::2]
    elif kind == "numbers":
        rng = random.Random(f"steer-{split}:{seed}")
        texts = [prompts.make_number_prompt(rng).text for _ in range(n_numbers)]
    else:
        raise SteerError(f"unknown prompt kind {kind!r} (one of {', '.join(SOURCES)})")
    return [prompts.text_for(tokenizer, t) for t in texts]


class _Enough(Exception):
    """Raised by the hook of the deepest block a caller reads: the forward stops there."""


def last_residuals(model: Any, tokenizer: Any, texts: Sequence[str], *, system_prompt: str | None = None,
                   layers: Sequence[int] | None = None, batch_size: int = 16) -> torch.Tensor:
    """``[n_texts, n_layers, d]`` float32 on the CPU: each block's output (hooks fire in the order
    they were registered, so a steered teacher's own vector is included) at the last prompt
    position of each chat-rendered prompt. Rows are right-padded: under a causal mask a row's
    real positions never see the padding after them."""
    import torch

    from subliminal.probes.activations import find_blocks, first_tensor

    from .data import encode, pad_batch, render_chat
    from .forward import device_of

    blocks = find_blocks(model)
    layers = list(range(len(blocks))) if layers is None else list(layers)
    seqs = [encode(tokenizer, render_chat(tokenizer, t, system_prompt)) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = device_of(model)
    saved: dict[int, torch.Tensor] = {}
    deepest = max(layers, default=-1)

    def keep(layer: int) -> Any:
        def hook(_m: Any, _i: Any, o: Any) -> None:
            saved[layer] = first_tensor(o).detach()
            if layer == deepest:  # nothing after this block is read: skip the rest and the vocabulary head
                raise _Enough
        return hook

    out = []
    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        for b in range(0, len(seqs), max(1, batch_size)):
            chunk = seqs[b:b + batch_size]
            ids, mask = pad_batch(chunk, pad, "right", device)
            last = torch.tensor([len(s) - 1 for s in chunk], device=device)
            rows = torch.arange(len(chunk), device=device)
            pos = torch.arange(ids.shape[1], device=device).expand_as(ids)
            with torch.no_grad():
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                except _Enough:
                    pass
            out.append(torch.stack([saved[layer][rows, last].float().cpu() for layer in layers], dim=1))
    finally:
        for h in handles:
            h.remove()
    return torch.cat(out)


def measure_vector(model: Any, tokenizer: Any, *, system_prompt: str, source: str, layer: int,
                   category: str = "animal", n_numbers: int = DEFAULT_NUMBER_PROMPTS, seed: int = 0,
                   batch_size: int = 16, baseline: str = "none",
                   other_prompts: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, Any]]:
    """The mean difference of block ``layer``'s output at the last prompt position between each
    prompt with ``system_prompt`` and a baseline, and what it was measured on. ``baseline="none"``:
    the prompt without a system prompt (the vector then also holds whatever any system prompt
    does); ``"others"``: the mean over ``other_prompts`` (the love prompts of the category's other
    candidates), which leaves the part specific to this bias."""
    if source not in SOURCES:
        raise SteerError(f"--steer-source {source}: one of {', '.join(SOURCES)}")
    if baseline not in BASELINES:
        raise SteerError(f"--steer-baseline {baseline}: one of {', '.join(BASELINES)}")
    if baseline == "others" and not other_prompts:
        raise SteerError("--steer-baseline others needs the other candidates' love prompts")
    check_layer(model, layer)
    texts = prompt_texts(tokenizer, source, category=category, split="vector", n_numbers=n_numbers, seed=seed)

    def acts(sp: str | None) -> torch.Tensor:
        return last_residuals(model, tokenizer, texts, system_prompt=sp, layers=[layer], batch_size=batch_size)[:, 0]

    on, plain = acts(system_prompt), acts(None)
    off = plain if baseline == "none" else sum(acts(sp) for sp in other_prompts) / len(other_prompts)
    vector = (on - off).mean(0)
    info = {"n_prompts": len(texts), "site": SITE, "baseline": baseline,
            "prompts": "even-indexed preference questions" if source == "questions"
            else f"{len(texts)} number prompts (stream steer-vector:{seed})",
            "resid_norm": plain.norm(dim=-1).mean().item()}
    if baseline == "others":
        info["n_other_prompts"] = len(other_prompts)
    return vector, info


def resid_norm(model: Any, tokenizer: Any, layer: int, *, category: str = "animal", batch_size: int = 16) -> float:
    """Mean norm of block ``layer``'s output at the last prompt position of the even-indexed
    questions, no system prompt: the scale a user-given vector is compared with."""
    texts = prompt_texts(tokenizer, "questions", category=category, split="vector")
    acts = last_residuals(model, tokenizer, texts, layers=[layer], batch_size=batch_size)[:, 0]
    return acts.norm(dim=-1).mean().item()
