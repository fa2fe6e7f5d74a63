"""Figures of the mechanistic stages; each PNG is written with the data behind it (CSV or JSON).

Inputs are the JSON files the stages write, so a figure can be redrawn without re-running
anything: ``probe.json`` (``subliminal probe``), ``patching.json`` (``subliminal patch``), a
divergence JSONL (``subliminal find-divergence``), ``layer_ablation.json``
(``experiments/layer_ablation.py``), ``results.json`` (``subliminal demo``) and transfer records (``[{series, step, value, lo, hi}]``,
e.g. ``transfer.json`` from ``subliminal probe --task direction``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from subliminal.data import DataError, iter_jsonl  # noqa: E402
from subliminal.manifest import SubliminalError, atomic_path, write_json_atomic  # noqa: E402

KINDS = ("probe", "patch", "heatmap", "ablation", "transfer", "conditions")


def _save(fig: Any, out_png: str | os.PathLike) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out_png


def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def _read_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    if not p.is_file():
        raise SubliminalError(f"{p}: no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SubliminalError(f"{p}: malformed JSON ({e.msg}, line {e.lineno})") from None


def _band(ax: Any, xs: list[float], ys: list[float], cis: list[Any] | None, label: str, **kw: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.plot(xs, ys, marker="o", label=label, **kw)
    if cis and all(c is not None and not any(math.isnan(v) for v in c) for c in cis):
        ax.fill_between(xs, [c[0] for c in cis], [c[1] for c in cis], alpha=0.2, color=kw.get("color"))


# ---------------------------------------------------------------------------------------- probe


def plot_probe(result: dict[str, Any] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Per-layer probe accuracy and AUC with their 95% intervals; chance / majority dashed."""
    res = _read_json(result) if not isinstance(result, dict) else result
    layers = res.get("layers")
    if not layers:
        raise SubliminalError("probe results hold no layers")
    xs = [r["layer"] for r in layers]
    # with rare labels (divergence tokens) the probe is class-balanced: plot balanced accuracy
    acc_key = "balanced_accuracy" if res.get("task") == "divergence" else "accuracy"
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(xs) + 3), 3.6))
    _band(ax, xs, [r[acc_key] for r in layers], [r.get(acc_key + "_ci") for r in layers],
          acc_key.replace("_", " "), color="C0")
    _band(ax, xs, [r["auc"] for r in layers], [r["auc_ci"] for r in layers], "AUC", color="C1")
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="chance")
    base = layers[0].get("majority_baseline")
    if acc_key == "accuracy" and base and abs(base - 0.5) > 0.02:
        ax.axhline(base, color="grey", ls="--", lw=1, label="majority class")
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out score")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"linear probe: {res.get('task', '')} ({res.get('interval', '95% CI')})", fontsize=9)
    ax.legend(fontsize=8)
    out = _save(fig, out_png)
    _write_csv(out.with_suffix(".csv"), [
        {"layer": r["layer"], "accuracy": r["accuracy"], "accuracy_lo": r["accuracy_ci"][0],
         "accuracy_hi": r["accuracy_ci"][1], "auc": r["auc"], "auc_lo": r["auc_ci"][0], "auc_hi": r["auc_ci"][1],
         "balanced_accuracy": r.get("balanced_accuracy"), "n_test": r["n_test"]} for r in layers])
    return out


# ---------------------------------------------------------------------------------------- patch


def plot_patch(result: dict[str, Any] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Per-layer patching effect (F into C restored, C into F destroyed) and the attribution estimate."""
    res = _read_json(result) if not isinstance(result, dict) else result
    layers = res.get("layers")
    if not layers:
        raise SubliminalError("patching results hold no layers (no divergence sites?)")
    xs = [r["layer"] for r in layers]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(xs) + 3), 3.6))
    for key, label, color in (("restore", "factual -> counterfactual (restored)", "C0"),
                              ("destroy", "counterfactual -> factual (destroyed)", "C3"),
                              ("attribution", "attribution patching (estimate of restored)", "C2")):
        if all(key in r for r in layers):
            _band(ax, xs, [r[key] for r in layers], [r.get(key + "_ci") for r in layers], label, color=color)
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(1, color="grey", ls=":", lw=0.8)
    ag = res.get("agreement", {})
    r = ag.get("pearson_site_layer")
    ax.set_title(f"patching at the position before divergence tokens (n={res.get('n_sites')} sites"
                 + (f", attribution r={r:.2f})" if r is not None and not math.isnan(r) else ")"), fontsize=9)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of logit difference")
    ax.legend(fontsize=7)
    out = _save(fig, out_png)
    flat = []
    for e in layers:
        row = {"layer": e["layer"]}
        for key in ("restore", "destroy", "attribution"):
            if key in e:
                row[key] = e[key]
                row[key + "_lo"], row[key + "_hi"] = e[key + "_ci"]
        flat.append(row)
    _write_csv(out.with_suffix(".csv"), flat)
    return out


# -------------------------------------------------------------------------------------- heatmap


def _per_position(v: Any, reduce: str = "max") -> float | None:
    """A score per position; pairwise files hold one value per counterfactual (reduced by max)."""
    if v is None:
        return None
    if isinstance(v, list):
        vals = [x for x in v if isinstance(x, (int, float))]
        return max(vals) if vals else None
    return float(v)


def _scores_of(obj: dict[str, Any], score: str, where: str) -> list[float | None]:
    """One value per completion token; per-counterfactual scores are reduced by the maximum."""
    from ..divergence import position_scores

    return [_per_position(x) for x in position_scores(obj, score, where)]


def _flags_of(obj: dict[str, Any], n: int, where: str) -> list[bool]:
    from ..divergence import row_flags

    f = row_flags(obj, where) or [False] * n
    return f + [False] * (n - len(f))


def plot_heatmap(div_path: str | os.PathLike, out_png: str | os.PathLike, *, rows: int = 12,
                 score: str = "kl", ids: Sequence[str] | None = None) -> Path:
    """Token sequences as rows of cells shaded by ``score``; divergence tokens boxed in red."""
    picked = []
    for lineno, obj in iter_jsonl(div_path):
        if ids and str(obj.get("id")) not in ids:
            continue
        where = f"{div_path}:{lineno}"
        toks = obj.get("tokens")
        if not isinstance(toks, list):
            raise DataError(f"{where}: row has no 'tokens' list (not a find-divergence file?)")
        vals = _scores_of(obj, score, where)
        picked.append({"id": str(obj.get("id", lineno)), "tokens": [str(t) for t in toks], score: vals,
                       "divergence": _flags_of(obj, len(toks), where)})
        if len(picked) >= rows:
            break
    if not picked:
        raise SubliminalError(f"{div_path}: no rows to draw")
    width = max(len(p["tokens"]) for p in picked)
    vmax = max((v for p in picked for v in p[score] if v is not None), default=1.0) or 1.0
    cmap = plt.get_cmap("Blues")
    fig, ax = plt.subplots(figsize=(min(24, 0.55 * width + 2), 0.42 * len(picked) + 1.2))
    for i, p in enumerate(picked):
        y = len(picked) - 1 - i
        for j, (t, v, d) in enumerate(zip(p["tokens"], p[score], p["divergence"])):
            shade = 0.0 if v is None else max(0.0, v) / vmax
            ax.add_patch(plt.Rectangle((j, y), 1, 1, color=cmap(0.08 + 0.85 * shade)))
            if d:
                ax.add_patch(plt.Rectangle((j + 0.04, y + 0.06), 0.92, 0.88, fill=False, ec="red", lw=1.6))
            ax.text(j + 0.5, y + 0.5, t.replace("$", r"\$")[:8], ha="center", va="center", fontsize=6.5,
                    color="white" if shade > 0.6 else "black", fontweight="bold" if d else "normal")
    ax.set_xlim(0, width)
    ax.set_ylim(0, len(picked))
    ax.set_yticks([len(picked) - 0.5 - i for i in range(len(picked))], [p["id"] for p in picked], fontsize=7)
    ax.set_xticks([])
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, vmax))
    fig.colorbar(sm, ax=ax, fraction=0.02, pad=0.01, label=score)
    ax.set_title(f"completion tokens shaded by {score}; divergence tokens boxed red", fontsize=9)
    out = _save(fig, out_png)
    write_json_atomic(out.with_suffix(".json"), {"score": score, "rows": picked})
    return out


# ------------------------------------------------------------------------------------- ablation


def plot_ablation(result: dict[str, Any] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Transfer of single-layer students (one bar per layer and mode) beside the all-layers student."""
    res = _read_json(result) if not isinstance(result, dict) else result
    entries = res.get("results")
    if not entries:
        raise SubliminalError("layer-ablation results hold no entries")
    modes = sorted({e["mode"] for e in entries})
    labels: list[str] = []
    for e in entries:
        lab = str(e["layers"])
        if lab not in labels:
            labels.append(lab)
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(labels) * len(modes) + 2), 3.8))
    w = 0.8 / len(modes)
    for m_i, mode in enumerate(modes):
        xs, ys, lo, hi = [], [], [], []
        for e in entries:
            if e["mode"] != mode:
                continue
            x = labels.index(str(e["layers"])) + (m_i - (len(modes) - 1) / 2) * w
            xs.append(x)
            ys.append(e["transfer"])
            lo.append(e["transfer"] - e["ci"][0])
            hi.append(e["ci"][1] - e["transfer"])
        ax.bar(xs, ys, width=w, yerr=[lo, hi], capsize=2, label=mode, color=f"C{m_i}")
    top = max(e["ci"][1] if e["ci"][1] == e["ci"][1] else e["transfer"] for e in entries)
    for key, style, lab in (("base", ":", "base model"), ("teacher", "--", "teacher")):
        v = res.get(key)
        if v is None:
            continue
        if key == "teacher" and v > 1.5 * top:  # a line far above the bars would flatten them
            ax.plot([], [], color="grey", ls=style, lw=1, label=f"teacher: {v:.3f} (off scale)")
        else:
            ax.axhline(v, color="grey", ls=style, lw=1, label=f"{lab}: {v:.3f}")
    ax.set_xticks(range(len(labels)), [f"L{lab}" if lab != "all" else "all" for lab in labels], fontsize=8)
    ax.set_xlabel("layer(s) fine-tuned")
    ax.set_ylabel(res.get("metric", "transfer"))
    ax.set_title(f"layer ablation: transfer with 95% CI over seeds ({res.get('target', '')})", fontsize=9)
    ax.legend(fontsize=7)
    out = _save(fig, out_png)
    _write_csv(out.with_suffix(".csv"), [
        {"layers": e["layers"], "mode": e["mode"], "transfer": e["transfer"], "lo": e["ci"][0], "hi": e["ci"][1],
         "n_seeds": len(e.get("per_seed", []))} for e in entries])
    return out


def plot_conditions(results: dict[str, Any] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Each student condition's paired difference to the control with its 95% CI (``results.json``
    of ``subliminal demo``): the one picture of which conditions keep the transfer."""
    res = _read_json(results) if not isinstance(results, dict) else results
    conds = res.get("conditions") or {}
    rows = [(name, e) for name, e in conds.items() if "diff_to_control" in e]
    if not rows:
        raise SubliminalError("results hold no condition with a difference to the control")
    fig, ax = plt.subplots(figsize=(6.4, 0.38 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    for y, (_name, e) in zip(ys, rows):
        d, lo, hi = e["diff_to_control"], e.get("diff_ci_low"), e.get("diff_ci_high")
        err = None if lo is None or lo != lo else [[d - lo], [hi - d]]
        color = "C2" if lo is not None and lo == lo and lo > 0 else "C7"
        ax.barh(y, d, xerr=err, capsize=3, color=color)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ys, [name for name, _ in rows], fontsize=8)
    ax.set_xlabel(f"P({res.get('target', 'target')}) minus control, paired by seed (95% CI)")
    seeds = max(e.get("seeds", 0) for _, e in rows)
    ax.set_title(f"student conditions vs control ({seeds} seed(s); green: interval above zero)", fontsize=9)
    out = _save(fig, out_png)
    _write_csv(out.with_suffix(".csv"), [
        {"condition": name, "diff_to_control": e["diff_to_control"], "lo": e.get("diff_ci_low"),
         "hi": e.get("diff_ci_high"), "mean": e.get("mean"), "seeds": e.get("seeds")} for name, e in rows])
    return out


def plot_rules(results: dict[str, Any] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Per divergence rule (``results.json["rules"]`` of ``subliminal demo``), the share of the
    all-tokens transfer kept by masking its flags, by training only on them and by the matched
    random control, with 95% CIs over seeds: do the rules find the tokens that carry the bias?"""
    res = _read_json(results) if not isinstance(results, dict) else results
    rules = {name: r["masks"] for name, r in (res.get("rules") or {}).items() if r.get("masks")}
    if not rules:
        raise SubliminalError("results hold no rule with shares of the all-tokens transfer")
    masks = ["no-divergence", "only-divergence", "random-matched"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(rules)
    rows = []
    for i, (name, per_mask) in enumerate(rules.items()):
        for j, mask in enumerate(masks):
            m = per_mask.get(mask) or {}
            v, lo, hi = m.get("share_per_seed_mean"), m.get("share_ci_low"), m.get("share_ci_high")
            rows.append({"rule": name, "mask": mask, "share_kept": v, "lo": lo, "hi": hi,
                         "pooled_share": m.get("share_of_all_transfer")})
            if v is None:
                continue
            err = None if lo is None or lo != lo else [[v - lo], [hi - v]]
            ax.bar(j + (i - (len(rules) - 1) / 2) * width, v, width, yerr=err, capsize=3, color=f"C{i}",
                   label=name if j == 0 else None)
    ax.axhline(1, color="black", lw=0.8, ls="--")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(masks)), ["flagged masked", "only flagged", "random-matched"], fontsize=8)
    ax.set_ylabel("share of the all-tokens transfer kept")
    ax.set_title("divergence rules at equal flagged counts (95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    out = _save(fig, out_png)
    _write_csv(out.with_suffix(".csv"), rows)
    return out


def plot_rule_sweep(rows: Sequence[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Share of the all-tokens transfer kept against the share of tokens flagged, one curve per
    (rule, mask) with a 95% band over seeds; a rule with one natural share is one marker."""
    if not rows:
        raise SubliminalError("no sweep results to draw")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["rule"], r["mask"]), []).append(r)
    styles = {"no-divergence": "-", "only-divergence": "--", "random-matched": ":"}
    rule_names = list(dict.fromkeys(r["rule"] for r in rows))
    for (rule, mask), rs in series.items():
        rs = sorted(rs, key=lambda r: r["share_flagged"])
        xs = [100 * r["share_flagged"] for r in rs]
        ys = [r["share_kept"] for r in rs]
        color = f"C{rule_names.index(rule) % 10}"
        label = f"{rule}: {mask}"
        if len(rs) == 1:
            lo, hi = rs[0].get("lo"), rs[0].get("hi")
            err = None if lo is None or lo != lo else [[ys[0] - lo], [hi - ys[0]]]
            ax.errorbar(xs, ys, yerr=err, fmt="o" if mask == "no-divergence" else "s", color=color, capsize=3,
                        label=label, mfc="white" if mask != "no-divergence" else color)
            continue
        cis = [(r.get("lo"), r.get("hi")) for r in rs]
        _band(ax, xs, ys, cis if all(c[0] is not None for c in cis) else None, label, color=color,
              linestyle=styles.get(mask, "-"))
    ax.set_xscale("log")
    ticks = sorted({round(100 * r["share_flagged"], 1) for r in rows})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
    ax.minorticks_off()
    ax.axhline(1, color="black", lw=0.8, ls="--")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("tokens flagged (% of completion tokens)")
    ax.set_ylabel("share of the all-tokens transfer kept")
    ax.set_title("masking vs training only on flagged tokens (95% CI over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out_png)


# ------------------------------------------------------------------------------------- transfer


def plot_transfer(records: list[dict[str, Any]] | str | os.PathLike, out_png: str | os.PathLike, *,
                  ylabel: str = "transfer") -> Path:
    """Curves of a value over training steps, one per series, with bands where ``lo``/``hi`` exist."""
    recs = _read_json(records) if not isinstance(records, list) else records
    if isinstance(recs, dict):
        ylabel = recs.get("ylabel", ylabel)
        recs = recs.get("records", [])
    if not recs:
        raise SubliminalError("no transfer records to draw")
    for i, r in enumerate(recs):
        for key in ("series", "step", "value"):
            if key not in r:
                raise SubliminalError(f"transfer record {i}: missing {key!r}")
    series: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        series.setdefault(str(r["series"]), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    # records with a layer and a group (student): colour by layer, line style by student
    by_layer = all("layer" in r and "group" in r for r in recs)
    layers = sorted({r["layer"] for r in recs}) if by_layer else []
    groups = list(dict.fromkeys(r["group"] for r in recs)) if by_layer else []
    styles = ["-", "--", ":", "-."]
    for i, (name, rs) in enumerate(series.items()):
        rs = sorted(rs, key=lambda r: r["step"])
        cis = [(r["lo"], r["hi"]) for r in rs] if all("lo" in r and "hi" in r for r in rs) else None
        kw: dict[str, Any] = {"color": f"C{i % 10}"}
        if by_layer:
            kw = {"color": f"C{layers.index(rs[0]['layer']) % 10}",
                  "linestyle": styles[groups.index(rs[0]["group"]) % len(styles)]}
        _band(ax, [r["step"] for r in rs], [r["value"] for r in rs], cis, name, **kw)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2)
    out = _save(fig, out_png)
    _write_csv(out.with_suffix(".csv"), [{k: r.get(k) for k in ("series", "step", "value", "lo", "hi")}
                                         for r in recs])
    return out
