"""Activation patching on divergence tokens, and its gradient-based approximation.

For a row and a completion token ``x_k``, the *site* is the position that predicts it. A
divergence site (pairwise rule, recomputed from the two models so any data file will do) is
one where the factual teacher F's greedy choice is ``x_k`` and the counterfactual teacher C's
is another token ``t``. The metric at the site is the logit difference
``m = logit(x_k) - logit(t)``; F has ``m_F > 0``, C has ``m_C <= 0``.

Per layer ``l`` we run C with block ``l``'s output (the residual stream
``blocks.{l}.hook_resid_post``) replaced by F's, at the site only (``span="position"``) or at
every position (``span="all"``, which needs sequences of the same length), and report the
fraction of the gap restored: ``(m_patched - m_C) / (m_F - m_C)``. The reverse (C into F) reports
the fraction destroyed: ``(m_F - m_patched) / (m_F - m_C)``.

Attribution patching replaces the L forward passes by one backward pass: the first-order
estimate of patching layer ``l`` is ``(a_F - a_C) . dm/da`` at C's run. With ``steps > 1`` the
gradient is averaged over runs whose input embeddings are interpolated between C's and F's
(integrated-gradients style), which needs inputs of the same length; when they differ the
estimate falls back to the plain gradient at C, and the result says so. The path runs through
C's weights: for prompt teachers (shared weights) its end is F's run; for teachers whose weights
differ it is an approximation, and so is the last layer's effect, which goes through C's own
final norm and unembedding (it can exceed 1).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from subliminal.data import Row, align_row, model_max_length
from subliminal.manifest import SubliminalError
from subliminal.models import LoadedModel

from .activations import find_blocks, first_tensor

log = logging.getLogger(__name__)
SPANS = ("position", "all")


@dataclass
class Site:
    row: str
    k: int  # completion token index
    token: int  # the data token x_k
    other: int  # the counterfactual's top token
    pos_f: int  # position predicting x_k in F's input
    pos_c: int
    m_f: float
    m_c: float
    restore: dict[int, float] = field(default_factory=dict)  # layer -> fraction restored (F into C)
    destroy: dict[int, float] = field(default_factory=dict)  # layer -> fraction destroyed (C into F)
    attribution: dict[int, float] = field(default_factory=dict)  # layer -> estimate of ``restore``

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RowRun:
    """One row under both teachers: input ids and every layer's output at every position."""

    row: str
    ids_f: list[int]
    ids_c: list[int]
    n_prompt_f: int
    n_prompt_c: int
    logits_f: torch.Tensor  # (T_f, vocab)
    logits_c: torch.Tensor
    acts_f: torch.Tensor  # (n_layers, T_f, d)
    acts_c: torch.Tensor


@contextlib.contextmanager
def _hooks(model: torch.nn.Module, fn_by_layer: dict[int, Any]) -> Iterator[None]:
    blocks = find_blocks(model)
    handles = [blocks[layer].register_forward_hook(fn) for layer, fn in fn_by_layer.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_output(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


def run_with_acts(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(T, vocab)`` and every block's output ``(n_layers, T, d)`` for one sequence."""
    blocks = find_blocks(model)
    saved: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_m, _i, out):
            saved[layer] = first_tensor(out)[0].detach()
        return hook

    device = next(model.parameters()).device
    with torch.no_grad(), _hooks(model, {i: keep(i) for i in range(len(blocks))}):
        logits = model(torch.tensor([ids], device=device)).logits[0]
    return logits.float(), torch.stack([saved[i] for i in range(len(blocks))])


def prepare_row(f: LoadedModel, c: LoadedModel, row: Row) -> RowRun:
    af = align_row(f.tokenizer, row, f.system_prompt, model_max_length(f.model))
    ac = align_row(c.tokenizer, row, c.system_prompt, model_max_length(c.model))
    if af.completion_ids != ac.completion_ids:
        raise SubliminalError(f"row {row.id!r}: the two teachers tokenise the completion differently")
    lf, xf = run_with_acts(f.model, af.input_ids)
    lc, xc = run_with_acts(c.model, ac.input_ids)
    return RowRun(row.id, af.input_ids, ac.input_ids, af.n_prompt, ac.n_prompt, lf, lc, xf, xc)


def divergence_sites(run: RowRun, *, rule: str = "paper") -> list[Site]:
    """Sites of a row: ``paper`` = F's argmax is the data token and C's is not; ``all`` = every
    completion token where C's argmax is not the data token (F's choice unconstrained)."""
    n_comp = len(run.ids_f) - run.n_prompt_f
    sites = []
    for k in range(n_comp):
        pf, pc = run.n_prompt_f + k - 1, run.n_prompt_c + k - 1
        tok = run.ids_f[pf + 1]
        top_f = int(run.logits_f[pf].argmax())
        top_c = int(run.logits_c[pc].argmax())
        if top_c == tok or (rule == "paper" and top_f != tok):
            continue
        m_f = (run.logits_f[pf, tok] - run.logits_f[pf, top_c]).item()
        m_c = (run.logits_c[pc, tok] - run.logits_c[pc, top_c]).item()
        if m_f - m_c <= 1e-6:  # no gap to restore
            continue
        sites.append(Site(run.row, k, tok, top_c, pf, pc, m_f, m_c))
    return sites


def _patched_metric(
    model: torch.nn.Module,
    ids: list[int],
    pos: int,
    source: torch.Tensor,  # (n_layers, T_src, d)
    src_pos: int,
    layers: Sequence[int],
    tok: int,
    other: int,
    span: str,
) -> list[float]:
    """The metric at ``pos`` with each layer in ``layers`` patched in turn (one batch row per layer)."""
    device = next(model.parameters()).device
    ids_t = torch.tensor([ids[: pos + 1]] * len(layers), device=device)
    rows_of = {layer: [j for j, x in enumerate(layers) if x == layer] for layer in set(layers)}

    def patch(layer: int):
        def hook(_m, _i, out):
            h = first_tensor(out).clone()
            for j in rows_of[layer]:
                if span == "all":
                    h[j, : pos + 1] = source[layer, : pos + 1].to(h.dtype)
                else:
                    h[j, pos] = source[layer, src_pos].to(h.dtype)
            return _replace_output(out, h)
        return hook

    with torch.no_grad(), _hooks(model, {layer: patch(layer) for layer in rows_of}):
        logits = model(ids_t).logits[:, pos].float()
    return (logits[:, tok] - logits[:, other]).tolist()


def patch_site(f: LoadedModel, c: LoadedModel, run: RowRun, site: Site, layers: Sequence[int], *,
               span: str = "position") -> None:
    """Fill ``site.restore`` (F into C) and ``site.destroy`` (C into F) for every layer."""
    if span not in SPANS:
        raise SubliminalError(f"unknown span {span!r} (one of {', '.join(SPANS)})")
    if span == "all" and (len(run.ids_f) != len(run.ids_c) or site.pos_f != site.pos_c):
        raise SubliminalError(f"row {run.row!r}: span 'all' needs inputs of the same length under both "
                              f"teachers ({len(run.ids_f)} vs {len(run.ids_c)} tokens); use span 'position'")
    gap = site.m_f - site.m_c
    into_c = _patched_metric(c.model, run.ids_c, site.pos_c, run.acts_f, site.pos_f, layers, site.token,
                             site.other, span)
    into_f = _patched_metric(f.model, run.ids_f, site.pos_f, run.acts_c, site.pos_c, layers, site.token,
                             site.other, span)
    for layer, mc, mf in zip(layers, into_c, into_f):
        site.restore[layer] = (mc - site.m_c) / gap
        site.destroy[layer] = (site.m_f - mf) / gap


def attribute_site(f: LoadedModel, c: LoadedModel, run: RowRun, site: Site, layers: Sequence[int], *,
                   steps: int = 8, span: str = "position") -> bool:
    """Fill ``site.attribution``; returns whether the interpolation path was used."""
    model = c.model
    blocks = find_blocks(model)
    device = next(model.parameters()).device
    pos = site.pos_c
    same_len = len(run.ids_f) == len(run.ids_c) and site.pos_f == site.pos_c
    interpolate = steps > 1 and same_len
    emb = model.get_input_embeddings()
    with torch.no_grad():
        e_c = emb(torch.tensor([run.ids_c[: pos + 1]], device=device))
        if interpolate:
            e_f = emb(torch.tensor([run.ids_f[: site.pos_f + 1]], device=device))
            alphas = (torch.arange(steps, device=device, dtype=e_c.dtype) + 0.5) / steps
            embeds = e_c + alphas[:, None, None] * (e_f - e_c)
        else:
            embeds = e_c
    embeds = embeds.detach().requires_grad_(False)
    outs: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_m, _i, out):
            h = first_tensor(out)
            h.retain_grad()
            outs[layer] = h
        return hook

    with torch.enable_grad(), _hooks(model, {layer: keep(layer) for layer in range(len(blocks))}):
        logits = model(inputs_embeds=embeds).logits[:, pos].float()
        (logits[:, site.token] - logits[:, site.other]).sum().backward()
    gap = site.m_f - site.m_c
    for layer in layers:
        g = outs[layer].grad.mean(0)  # average over interpolation steps
        diff = (run.acts_f[layer, : site.pos_f + 1] - run.acts_c[layer, : pos + 1]) if span == "all" \
            else (run.acts_f[layer, site.pos_f] - run.acts_c[layer, pos])
        g = g[: pos + 1] if span == "all" else g[pos]
        site.attribution[layer] = (diff.to(g.dtype) * g).sum().item() / gap
    model.zero_grad(set_to_none=True)
    return interpolate


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x = torch.tensor(a, dtype=torch.float64)
    y = torch.tensor(b, dtype=torch.float64)
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return torch.corrcoef(torch.stack([x, y]))[0, 1].item()


def summarise(sites: Sequence[Site], layers: Sequence[int], *, n_boot: int = 500, seed: int = 0) -> dict[str, Any]:
    """Per-layer mean effect with a 95% bootstrap interval over rows, and attribution agreement."""
    from .linear import bootstrap_ci

    groups = [s.row for s in sites]
    per_layer = []
    for layer in layers:
        entry: dict[str, Any] = {"layer": layer}
        for key in ("restore", "destroy", "attribution"):
            vals = torch.tensor([getattr(s, key).get(layer, math.nan) for s in sites], dtype=torch.float64)
            if not sites or torch.isnan(vals).all():
                continue
            entry[key] = vals.nanmean().item()
            entry[key + "_ci"] = bootstrap_ci(groups, lambda ix, v=vals: v[ix].nanmean().item(), n_boot,
                                              seed + layer)
        per_layer.append(entry)
    exact = [s.restore.get(layer, math.nan) for s in sites for layer in layers]
    approx = [s.attribution.get(layer, math.nan) for s in sites for layer in layers]
    agreement = {
        "pearson_site_layer": pearson(exact, approx),
        "pearson_layer_means": pearson([e.get("restore", math.nan) for e in per_layer],
                                       [e.get("attribution", math.nan) for e in per_layer]),
        "mean_abs_error": float(torch.tensor(exact, dtype=torch.float64).sub(
            torch.tensor(approx, dtype=torch.float64)).abs().nanmean().item()) if sites else math.nan,
    }
    return {"n_sites": len(sites), "n_rows": len(set(groups)), "layers": per_layer, "agreement": agreement,
            "interval": "95% percentile bootstrap over rows"}
