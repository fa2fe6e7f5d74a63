"""Capture per-layer activations at chosen token positions, with TransformerLens or nnsight.

Both backends wrap the *same* Hugging Face module that :func:`subliminal.models.load_model`
returns, so a teacher directory (system prompt included) or a student checkpoint is read the
way every other stage reads it. Hook names follow TransformerLens: ``blocks.{l}.hook_resid_post``
(the residual stream after block ``l``), ``blocks.{l}.hook_attn_out`` and ``blocks.{l}.hook_mlp_out``.

A *site* is one position of one row. For a completion token ``k`` the site is the position that
*predicts* it (``n_prompt + k - 1``): that residual is what decides whether the model emits the
divergence token. The ``answer`` site of a preference question is the last prompt position, the
one that predicts the first answer token.

Sequences are right-padded in a batch: attention is causal, so the pads after a row never
change its activations and no position ids or masks are needed (left padding would shift
rotary positions).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from subliminal import distributed as dist
from subliminal import models
from subliminal.data import DataError, Row, align_row, iter_jsonl, model_max_length
from subliminal.divergence import row_flags
from subliminal.manifest import SubliminalError, atomic_path, write_json_atomic, write_manifest
from subliminal.models import LoadedModel

log = logging.getLogger(__name__)

COMPONENTS = ("resid_post", "attn_out", "mlp_out")
POSITIONS = ("completion", "divergence", "answer")
BACKENDS = ("auto", "transformer_lens", "nnsight")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")


def hook_name(layer: int, component: str = "resid_post") -> str:
    """The TransformerLens hook name for ``component`` of block ``layer``."""
    if component not in COMPONENTS:
        raise SubliminalError(f"unknown component {component!r} (one of {', '.join(COMPONENTS)})")
    return f"blocks.{layer}.hook_{component}"


def parse_hook_name(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or not parts[2].startswith("hook_"):
        raise SubliminalError(f"not a block hook name: {name!r}")
    return int(parts[1]), parts[2][len("hook_"):]


resolve_layers = models.resolve_layers  # the one --layers grammar (subliminal.models)


def n_layers_of(model: nn.Module) -> int:
    return models.layer_count(model.config)


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks: the first ``ModuleList`` as long as the config's layer count."""
    n = n_layers_of(model)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise SubliminalError(f"{type(model).__name__}: no list of {n} decoder blocks found")


def block_part(block: nn.Module, component: str) -> nn.Module:
    """The attention or MLP sub-module of one block (names differ across architectures)."""
    names = ATTN_NAMES if component == "attn_out" else MLP_NAMES
    for name in names:
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise SubliminalError(f"{type(block).__name__}: no {component[:-4]} sub-module (looked for {', '.join(names)})")


def first_tensor(x: Any) -> torch.Tensor:
    """Blocks and attention modules return a tensor or a tuple whose first item is the hidden state."""
    return x[0] if isinstance(x, (tuple, list)) else x


# ----------------------------------------------------------------------------------------- sites


@dataclass
class Example:
    """One row as the model sees it, with the sites to read."""

    id: str
    input_ids: list[int]
    n_prompt: int
    positions: list[int]  # sequence positions of the sites
    meta: list[dict[str, Any]] = field(default_factory=list)  # per site: token index, token id, label


def load_data_rows(path: str | os.PathLike, max_rows: int | None = None) -> list[tuple[Row, dict[str, Any], str]]:
    """Rows with ``prompt`` (and ``completion``) from a data or divergence JSONL, with their raw objects."""
    out = []
    for lineno, obj in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if "prompt" not in obj or not isinstance(obj["prompt"], str):
            raise DataError(f"{where}: row needs a 'prompt' string (a divergence file must carry prompt and "
                            "completion; pass the data file it was made from)")
        comp = obj.get("completion", "")
        if not isinstance(comp, str):
            raise DataError(f"{where}: 'completion' must be a string")
        out.append((Row(str(obj.get("id", lineno)), obj["prompt"], comp, obj.get("teacher")), obj, where))
        if max_rows is not None and len(out) >= max_rows:
            break
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def build_examples(
    tokenizer: Any,
    rows: list[tuple[Row, dict[str, Any], str]],
    *,
    system_prompt: str | None,
    positions: str = "completion",
    max_length: int | None = None,
) -> list[Example]:
    """Tokenise each row with the model's own system prompt and pick its sites."""
    if positions not in POSITIONS:
        raise SubliminalError(f"unknown positions {positions!r} (one of {', '.join(POSITIONS)})")
    examples = []
    for row, obj, where in rows:
        if positions == "answer":
            from subliminal.data import encode, render_chat

            ids = encode(tokenizer, render_chat(tokenizer, row.prompt, system_prompt))
            examples.append(Example(row.id, ids, len(ids), [len(ids) - 1], [{"k": -1, "token": None, "label": None}]))
            continue
        al = align_row(tokenizer, row, system_prompt, max_length)
        comp = al.completion_ids
        if "token_ids" in obj and list(obj["token_ids"])[: len(comp)] != comp[: len(obj["token_ids"])]:
            raise DataError(f"{where}: row {row.id!r}: token_ids differ from this tokenizer's completion tokens; "
                            "was the divergence file made with another tokenizer?")
        flags = row_flags(obj, where)
        if positions == "divergence" and flags is None:
            raise DataError(f"{where}: row {row.id!r} has no 'divergence' flags (use a find-divergence file)")
        ex = Example(row.id, al.input_ids, al.n_prompt, [])
        for k, tok in enumerate(comp):
            label = None if flags is None or k >= len(flags) else flags[k]
            if positions == "divergence" and not label:
                continue
            ex.positions.append(al.n_prompt + k - 1)
            ex.meta.append({"k": k, "token": tok, "label": label})
        if ex.positions:
            examples.append(ex)
    if not examples:
        raise SubliminalError(f"no sites selected (positions={positions})")
    return examples


# -------------------------------------------------------------------------------------- backends


def _batch_ids(examples: Sequence[Example], pad_id: int, device: torch.device) -> torch.Tensor:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
    return ids.to(device)


def _gather(x: torch.Tensor, examples: Sequence[Example]) -> torch.Tensor:
    b = torch.tensor([i for i, e in enumerate(examples) for _ in e.positions], device=x.device)
    p = torch.tensor([q for e in examples for q in e.positions], device=x.device)
    return x[b, p].float().cpu()


class TransformerLensBackend:
    """``TransformerBridge`` over the loaded HF module; ``run_with_cache`` with a names filter.

    Booting the bridge wraps the HF module's blocks in place (and switches attention to eager),
    so a model handed to this backend should not be handed to another one afterwards.
    """

    name = "transformer_lens"

    def __init__(self, loaded: LoadedModel):
        from transformer_lens.model_bridge import TransformerBridge

        model = loaded.model
        try:
            self.bridge = TransformerBridge.boot_transformers(
                str(getattr(model, "name_or_path", "") or loaded.source), hf_model=model,
                tokenizer=loaded.tokenizer, device=str(next(model.parameters()).device),
                dtype=next(model.parameters()).dtype,
            )
        except Exception as e:  # the bridge raises assorted errors for architectures it lacks
            arch = getattr(model.config, "architectures", None) or [type(model).__name__]
            raise UnsupportedByBackend(
                f"TransformerLens TransformerBridge cannot handle {arch[0]} ({type(e).__name__}: {e}); "
                "use --backend nnsight (or auto)"
            ) from e

    def run(self, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        wanted = set(names)
        with torch.no_grad():
            _, cache = self.bridge.run_with_cache(ids, names_filter=lambda n: n in wanted)
        missing = wanted - set(cache.keys())
        if missing:
            raise UnsupportedByBackend(f"TransformerBridge has no hook {sorted(missing)[0]!r} for this model")
        return {n: cache[n] for n in names}


class NNsightBackend:
    """``NNsight`` wrapping the HF module; block / attention / MLP outputs saved inside ``.trace``."""

    name = "nnsight"

    def __init__(self, loaded: LoadedModel):
        from nnsight import NNsight

        self.model = NNsight(loaded.model)
        self.blocks = find_blocks(loaded.model)
        # the same modules, addressed through the nnsight envoy tree
        path = next(n for n, m in loaded.model.named_modules() if m is self.blocks)
        env = self.model
        for part in path.split("."):
            env = getattr(env, part)
        self.envoys = env
        # nnsight reads a module's output before PyTorch's forward hooks run, so a steer teacher's
        # vector (added by a forward hook on its block: subliminal.steer) is added back here
        self.steer = _steer_delta(loaded)

    def _envoy(self, layer: int, component: str) -> Any:
        blk = self.envoys[layer]
        if component == "resid_post":
            return blk
        part = block_part(self.blocks[layer], component)
        name = next(n for n, m in self.blocks[layer].named_children() if m is part)
        return getattr(blk, name)

    def run(self, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
        # nnsight needs the modules in the order the forward pass reaches them
        rank = {"attn_out": 0, "mlp_out": 1, "resid_post": 2}
        ordered = sorted(names, key=lambda n: (parse_hook_name(n)[0], rank[parse_hook_name(n)[1]]))
        targets = [self._envoy(*parse_hook_name(n)) for n in ordered]
        saved = []
        with torch.no_grad(), self.model.trace(ids):
            for t in targets:
                saved.append(t.output.save())
        out = {n: first_tensor(s) for n, s in zip(ordered, saved)}
        if self.steer is not None:
            name = hook_name(self.steer[0], "resid_post")
            if name in out:
                out[name] = out[name] + self.steer[1].to(dtype=out[name].dtype, device=out[name].device)
        return out


def _steer_delta(loaded: LoadedModel) -> tuple[int, torch.Tensor] | None:
    """(layer, alpha * v) of a steer teacher, else None."""
    t = loaded.teacher
    if t is None or t.method != "steer":
        return None
    from subliminal.steer import load_vector

    s = t.extra["steer"]
    return s["layer"], float(s["alpha"]) * load_vector(s["vector"])


class UnsupportedByBackend(SubliminalError):
    pass


def make_backend(loaded: LoadedModel, backend: str = "auto") -> TransformerLensBackend | NNsightBackend:
    """TransformerLens or nnsight; ``auto`` tries TransformerLens and falls back to nnsight, saying so."""
    if backend == "transformer_lens":
        return TransformerLensBackend(loaded)
    if backend == "nnsight":
        return NNsightBackend(loaded)
    if backend != "auto":
        raise SubliminalError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    try:
        return TransformerLensBackend(loaded)
    except UnsupportedByBackend as e:
        log.warning("%s; falling back to nnsight", e)
        return NNsightBackend(loaded)


# ---------------------------------------------------------------------------------------- capture


def capture(
    loaded: LoadedModel,
    examples: Sequence[Example],
    names: Sequence[str],
    *,
    backend: str | Any = "auto",
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Activations ``{hook name: (n_sites, d_model)}`` in example / site order (float32, CPU)."""
    from tqdm.auto import tqdm

    be = make_backend(loaded, backend) if isinstance(backend, str) else backend
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    device = next(loaded.model.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    chunks = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    results: dict[int, dict[str, torch.Tensor]] = {}
    for chunk in tqdm(chunks, desc=f"activations ({be.name})", disable=not progress, leave=False):
        batch = [examples[i] for i in chunk]
        acts = be.run(_batch_ids(batch, pad, device), list(names))
        for n in names:
            per = _gather(acts[n], batch).split([len(e.positions) for e in batch])
            for i, t in zip(chunk, per):
                results.setdefault(i, {})[n] = t
    for i in range(len(examples)):
        for n in names:
            parts[n].append(results[i][n])
    return {n: torch.cat(v) if v else torch.empty(0) for n, v in parts.items()}


def site_table(examples: Sequence[Example]) -> list[dict[str, Any]]:
    return [{"row": e.id, "pos": p, **m} for e in examples for p, m in zip(e.positions, e.meta)]


def save_activations(
    out_dir: str | os.PathLike,
    acts: dict[str, torch.Tensor],
    examples: Sequence[Example],
    *,
    config: dict[str, Any],
    seed: int | None,
    inputs: dict[str, Any] | None = None,
    wall_time_s: float | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """``activations.safetensors`` (one tensor per hook name) + ``sites.json`` + ``manifest.json``
    (``extra``: more manifest fields, e.g. the shards of a multi-process capture)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "activations.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in acts.items()}, str(tmp))
    write_json_atomic(out_dir / "sites.json", site_table(examples))
    write_manifest(out_dir, stage="activations", config=config, seed=seed, inputs=inputs, wall_time_s=wall_time_s,
                   extra={"hooks": sorted(acts), "n_sites": len(site_table(examples)), **(extra or {})})
    return path


def load_activations(out_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    import json

    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    f = out_dir / "activations.safetensors"
    if not f.is_file():
        raise SubliminalError(f"{out_dir}: no activations.safetensors")
    return load_file(str(f)), json.loads((out_dir / "sites.json").read_text())


def capture_to_dir(
    loaded: LoadedModel,
    rows: list[tuple[Row, dict[str, Any], str]],
    out_dir: str | os.PathLike,
    *,
    layers: str | Sequence[int] | None = "all",
    components: Sequence[str] = ("resid_post",),
    positions: str = "completion",
    backend: str = "auto",
    batch_size: int = 16,
    seed: int | None = None,
    inputs: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[Example]]:
    """Capture and save; an existing complete capture with the same config is reused (resume).

    Under a launcher (``torchrun --nproc-per-node N``) each rank captures its contiguous shard of
    the examples (the rows with at least one site), rank 0 concatenates the shards in row order
    and writes the one output, whose manifest records ``world_size`` and the shards. The merged
    activations equal a one-process capture's (a row's residuals do not depend on its batch,
    floats within 1e-5). Returns the activations on rank 0 and ``{}`` on the other ranks (they
    have only their shard, and only rank 0 goes on to fit probes)."""
    t0 = time.time()
    lays = resolve_layers(layers, n_layers_of(loaded.model))
    names = [hook_name(layer, c) for layer in lays for c in components]
    examples = build_examples(loaded.tokenizer, rows, system_prompt=loaded.system_prompt, positions=positions,
                              max_length=model_max_length(loaded.model))
    config = {"model": loaded.source, "layers": lays, "components": list(components), "positions": positions,
              "backend": backend, "n_rows": len(rows)}
    with dist.agree("capture-check"):
        saved = _reusable(out_dir, config, names) if dist.is_main() else None
    if dist.all_gather(saved is not None)[0]:  # rank 0's verdict holds on every rank
        log.info("%s: reusing saved activations", out_dir)
        return (saved or {}), examples
    mine = dist.shard(len(examples))
    with dist.agree("capture"):
        part = capture(loaded, examples[mine.start: mine.stop], names, backend=backend, batch_size=batch_size,
                       progress=not dist.progress_disabled()) if len(mine) else {}
    gathered = dist.gather_to_main(part)
    acts: dict[str, torch.Tensor] = {}
    with dist.agree("capture-save"):
        if gathered is not None:
            acts = {n: torch.cat([g[n] for g in gathered if n in g]) for n in names}
            save_activations(out_dir, acts, examples, config=config, seed=seed, inputs=inputs,
                             wall_time_s=time.time() - t0, extra=dist.shard_record(len(examples)))
    return acts, examples


def _reusable(out_dir: str | os.PathLike, config: dict[str, Any], names: Sequence[str]
              ) -> dict[str, torch.Tensor] | None:
    """The saved activations of a finished capture with this exact config, else None."""
    from subliminal.manifest import read_manifest

    old = read_manifest(out_dir)
    if old and old.get("config") == config and (Path(out_dir) / "activations.safetensors").is_file():
        acts, _ = load_activations(out_dir)
        if set(names) <= set(acts):
            return {n: acts[n] for n in names}
    return None
