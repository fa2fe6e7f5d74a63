"""``subliminal probe``, ``subliminal patch`` and ``subliminal plot``."""

from __future__ import annotations

import argparse
import logging
import re
import time
from pathlib import Path
from typing import Any

import torch

from subliminal import distributed as dist
from subliminal.cliutil import add_model_runtime, add_overwrite, add_seed, device_type, runtime_kwargs
from subliminal.data import Row
from subliminal.manifest import (
    SubliminalError,
    check_resume,
    fingerprint,
    read_manifest,
    set_seed,
    write_fingerprint,
    write_json_atomic,
    write_manifest,
)

from . import plots

log = logging.getLogger(__name__)
TASKS = ("identity", "divergence", "direction")


# ------------------------------------------------------------------------------------ arguments


def add_cli(sub: Any) -> None:
    p = sub.add_parser("probe", help="per-layer linear probes: teacher identity, divergence, bias direction",
                       description="Capture residual-stream activations and fit one logistic-regression probe per "
                                   "layer (held-out rows, 95%% bootstrap intervals).")
    p.add_argument("--models", nargs="+", required=True,
                   help="model or teacher dirs: identity/direction: BIASED UNBIASED; divergence: FACTUAL")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="JSONL with prompt+completion per row (data or find-divergence file)")
    src.add_argument("--questions", metavar="CATEGORY",
                     help="use the preference questions of CATEGORY (animal, tree) instead of data")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--task", choices=TASKS, default="identity")
    p.add_argument("--layers", default="all", help="'all', '0,3,5' or '0-3' (default %(default)s)")
    p.add_argument("--positions", choices=("completion", "divergence", "answer"),
                   help="sites to read (default: answer with --questions, completion otherwise)")
    p.add_argument("--component", choices=("resid_post", "attn_out", "mlp_out"), default="resid_post",
                   help="which output of each block to probe (default %(default)s)")
    p.add_argument("--students", nargs="*", default=[],
                   help="direction task: student dirs whose checkpoint-* subdirs are projected on the direction")
    p.add_argument("--base", help="direction task: the students' initial model (plotted at step 0)")
    p.add_argument("--max-rows", type=int, default=None, help="use the first N rows")
    p.add_argument("--test-frac", type=float, default=0.3, help="held-out fraction of rows (default %(default)s)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the probe (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples for the CIs (default %(default)s)")
    _add_capture(p)
    add_seed(p)
    add_model_runtime(p)
    add_overwrite(p)
    p.set_defaults(func=run_probe)

    q = sub.add_parser("patch", help="activation patching (and attribution patching) on divergence tokens",
                       description="For each layer, patch the factual teacher's residual stream into the "
                                   "counterfactual's run at the position before each divergence token (and the "
                                   "reverse); report the fraction of the logit difference restored.")
    q.add_argument("--models", nargs=2, required=True, metavar=("FACTUAL", "COUNTERFACTUAL"))
    q.add_argument("--data", required=True, help="JSONL with prompt+completion per row (the factual teacher's data)")
    q.add_argument("--out", required=True)
    q.add_argument("--layers", default="all")
    q.add_argument("--span", choices=("position", "all"), default="position",
                   help="patch the site only, or every position (needs equal-length inputs) (default %(default)s)")
    q.add_argument("--rule", choices=("paper", "all"), default="paper",
                   help="paper: factual argmax == data token != counterfactual argmax; all: any token the "
                        "counterfactual does not predict (default %(default)s)")
    q.add_argument("--max-rows", type=int, default=None)
    q.add_argument("--max-sites", type=int, default=200, help="stop after this many sites (default %(default)s)")
    q.add_argument("--attr-steps", type=int, default=8,
                   help="interpolation steps of attribution patching; 0 turns it off (default %(default)s)")
    q.add_argument("--bootstrap", type=int, default=500)
    add_seed(q)
    add_model_runtime(q)
    add_overwrite(q)
    q.set_defaults(func=run_patch)

    r = sub.add_parser("plot", help="figures: probe, patch, heatmap, ablation, transfer, conditions (PNG + data)")
    r.add_argument("kind", choices=plots.KINDS)
    r.add_argument("input", help="probe.json / patching.json / *.div.jsonl / layer_ablation.json / transfer.json / "
                   "results.json (demo)")
    r.add_argument("--out", required=True, help="PNG path (the data goes beside it)")
    r.add_argument("--rows", type=int, default=12, help="heatmap: rows to draw (default %(default)s)")
    r.add_argument("--score", default="kl", help="heatmap: score that shades the tokens (default %(default)s)")
    r.add_argument("--ids", nargs="*", help="heatmap: only these row ids")
    r.set_defaults(func=run_plot)


def _add_capture(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("auto", "transformer_lens", "nnsight"), default="auto",
                   help="activation capture: TransformerLens bridge or nnsight; auto falls back to nnsight "
                        "when the bridge lacks the architecture (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16)


# ---------------------------------------------------------------------------------------- probe


def _rows(args: argparse.Namespace) -> list[tuple[Row, dict, str]]:
    from subliminal.prompts import CATEGORIES, preference_questions

    from .activations import load_data_rows

    if args.questions:
        if args.questions not in CATEGORIES:
            raise SubliminalError(f"--questions {args.questions}: one of {', '.join(CATEGORIES)}")
        qs = preference_questions(args.questions)
        if args.max_rows:
            qs = qs[: args.max_rows]
        return [(Row(f"q{i}", q, ""), {}, f"question {i}") for i, q in enumerate(qs)]
    return load_data_rows(args.data, args.max_rows)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(spec).name or "model")


def _capture(spec: str, rows: list, out: Path, args: argparse.Namespace, positions: str) -> tuple[dict, list]:
    """Per-layer activations ``{layer: (sites, d)}`` of one model and its sites (saved under ``out``)."""
    from subliminal.models import load_model

    from .activations import capture_to_dir, hook_name, n_layers_of, resolve_layers

    with dist.agree(f"load {spec}"):
        loaded = load_model(spec, **runtime_kwargs(args))
        layers = resolve_layers(args.layers, n_layers_of(loaded.model))
    acts, examples = capture_to_dir(loaded, rows, out, layers=layers, components=[args.component],
                                    positions=positions, backend=args.backend, batch_size=args.batch_size,
                                    seed=args.seed, inputs={"model": spec, "data": getattr(args, "data", None)})
    del loaded
    if not dist.is_main():  # another rank: its shard went to rank 0, which fits the probes
        return {}, examples
    return {layer: acts[hook_name(layer, args.component)] for layer in layers}, examples


def _groups(examples: list) -> list[str]:
    return [e.id for e in examples for _ in e.positions]


def run_probe(args: argparse.Namespace) -> int:
    """``subliminal probe``. Under a launcher every capture is sharded over the ranks (see
    :func:`probes.activations.capture_to_dir`); fitting the probes and their bootstrap is
    model-free and cheap, so rank 0 alone does it on the merged activations, with the same seed:
    the results equal a one-process run's."""
    t0 = time.time()
    set_seed(args.seed)
    dist.init(args.device)
    out = Path(args.out)
    with dist.agree("prepare"):
        positions = _probe_positions(args)
        fp = stage_fingerprint(args)
        action = _resume_action(args, out, "probe", fp, partial=None)
    if action == "skip":
        if dist.is_main():
            print(f"{out}: already probed by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    with dist.agree("rows"):
        rows = _rows(args)
    acts = [_capture(m, rows, out / "activations" / f"{i}-{_slug(m)}", args, positions)
            for i, m in enumerate(args.models)]
    students = _direction_captures(args, rows, positions, out) if args.task == "direction" else []
    with dist.agree("fit"):
        if dist.is_main():
            _fit_and_write(args, rows, acts, students, positions, out, t0, fp)
    return 0


# Arguments that do not change what a probe or patch run computes (paths are compared by content).
_NOT_SETTINGS = ("func", "out", "overwrite", "verbose", "command", "device", "trust_remote_code", "models", "data",
                 "students", "base")


def stage_fingerprint(args: argparse.Namespace) -> dict[str, Any]:
    """The inputs' contents (models, data, students) and every setting of a probe or patch run."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS}
    config["device"] = device_type(args.device)
    inputs = {f"model{i}": m for i, m in enumerate(args.models)}
    inputs.update({"data": getattr(args, "data", None), "base": getattr(args, "base", None),
                   **{f"student{i}": m for i, m in enumerate(getattr(args, "students", None) or [])}})
    return fingerprint(inputs, config)


def _resume_action(args: argparse.Namespace, out: Path, stage: str, fp: dict[str, Any],
                   partial: Path | None) -> str:
    """``skip`` for a finished run of this fingerprint, else ``resume``/``start`` (or refused)."""
    man = read_manifest(out) if out.is_dir() else None
    finished = man if man is not None and man.get("stage") == stage and man.get("complete", True) else None
    occupied = (out.is_dir() and finished is None and any(out.iterdir())
                and not (partial is not None and partial.is_file()))
    if stage == "probe":  # a probe keeps only its captures (reused by their own config) between runs
        occupied = occupied and (out / "probe.json").exists()
    return check_resume(out, fp, overwrite=getattr(args, "overwrite", False), stage=stage, finished=finished,
                        partial=partial, occupied=occupied)


def _probe_positions(args: argparse.Namespace) -> str:
    """Check the task's arguments (before any model loads); the sites to read."""
    need = 1 if args.task == "divergence" else 2
    if len(args.models) != need:
        raise SubliminalError(f"--task {args.task} takes {need} model(s) in --models, got {len(args.models)}")
    if args.students and args.task != "direction":
        raise SubliminalError("--students is for --task direction")
    positions = args.positions or ("answer" if args.questions else "completion")
    if args.task == "divergence" and positions == "answer":
        raise SubliminalError("--task divergence reads completion tokens; drop --questions / --positions answer")
    if args.task == "divergence" and positions == "divergence":
        raise SubliminalError("--task divergence needs both kinds of positions: use --positions completion")
    return positions


def _fit_and_write(args: argparse.Namespace, rows: list, acts: list, students: list, positions: str, out: Path,
                   t0: float, fp: dict[str, Any]) -> None:
    """Rank 0: fit the per-layer probes on the (merged) activations and write every output."""
    from .linear import probe_layers

    kw = dict(test_frac=args.test_frac, l2=args.l2, seed=args.seed, n_boot=args.bootstrap)
    result: dict[str, Any] = {"task": args.task, "models": args.models, "positions": positions,
                              "component": args.component,
                              "interval": "95% percentile bootstrap over held-out rows"}
    if args.task == "divergence":
        a, examples = acts[0]
        labels = [m["label"] for e in examples for m in e.meta]
        if any(v is None for v in labels):
            raise SubliminalError(f"{args.data}: rows lack 'divergence' flags; pass a find-divergence file")
        y = torch.tensor(labels, dtype=torch.long)
        if y.sum() == 0 or y.sum() == len(y):
            raise SubliminalError("the data has only one kind of position (no divergence tokens, or only them)")
        res = probe_layers(a, y, _groups(examples), balanced=True, **kw)
        result["positive_rate"] = y.float().mean().item()
    else:
        (a, ex_a), (b, ex_b) = acts
        x = {layer: torch.cat([a[layer], b[layer]]) for layer in a}
        y = torch.cat([torch.ones(len(a[next(iter(a))]), dtype=torch.long),
                       torch.zeros(len(b[next(iter(b))]), dtype=torch.long)])
        res = probe_layers(x, y, _groups(ex_a) + _groups(ex_b), **kw)
    result["layers"] = [r.to_json() for r in res]
    write_json_atomic(out / "probe.json", result, nan_as_null=True)  # AUC of one class: undefined
    plots.plot_probe(result, out / "probe_accuracy.png")
    if args.task == "direction":
        _direction(acts, students, out)
    write_manifest(out, stage="probe", config=vars_config(args), seed=args.seed,
                   inputs={"data": args.data, **{f"model{i}": m for i, m in enumerate(args.models)}},
                   wall_time_s=time.time() - t0,
                   extra={"fingerprint": fp, **dist.shard_record(len(acts[0][1])),
                          "sharding": "each capture's examples (rows with a site) split contiguously over the "
                                      "ranks (shards of model 0 here, each capture's own in its manifest); "
                                      "probes fitted by rank 0 on the merged activations"})
    best = max(res, key=lambda r: r.auc if r.auc == r.auc else -1)
    log.info("probe %s: best layer %d, accuracy %.3f, AUC %.3f -> %s", args.task, best.layer, best.accuracy,
             best.auc, out / "probe.json")


def checkpoints_of(student: str) -> list[tuple[int, str]]:
    """``(step, dir)`` for each ``checkpoint-N`` subdir, then the final model at the step count its
    manifest records (the last checkpoint's step + 1 without one)."""
    d = Path(student)
    if not d.is_dir():
        raise SubliminalError(f"{student}: no such student directory")
    ck = sorted((int(m.group(1)), str(p)) for p in d.iterdir()
                if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if (d / "config.json").is_file():
        from subliminal.manifest import read_manifest

        steps = (read_manifest(d) or {}).get("steps")  # distill records its step count
        final = steps if isinstance(steps, int) else ((ck[-1][0] + 1) if ck else 1)
        ck = [c for c in ck if c[0] != final] + [(final, str(d))]
    if not ck:
        raise SubliminalError(f"{student}: no checkpoint-* subdirs and no model of its own")
    return ck


def _direction_captures(args: argparse.Namespace, rows: list, positions: str, out: Path) -> list:
    """Every rank: capture each student checkpoint (sharded like the teachers' captures);
    ``[(student, [(step, dir, acts), ...]), ...]`` (acts empty on ranks other than 0)."""
    targets = [(s, checkpoints_of(s)) for s in args.students]
    if args.base:
        targets = [(s, [(0, args.base)] + ck) for s, ck in targets]
    return [(s, [(step, path, _capture(path, rows, out / "activations" / f"student-{_slug(s)}" / f"step-{step}",
                                       args, positions)[0]) for step, path in cks])
            for s, cks in targets]


def _direction(acts: list, students: list, out: Path) -> None:
    from .linear import bias_directions, projection_fraction

    biased, unbiased = acts[0][0], acts[1][0]
    dirs = bias_directions(biased, unbiased)
    records = []
    table: dict[str, Any] = {"direction_norm": {str(k): v.norm().item() for k, v in dirs.items()}, "students": {}}
    for s, cks in students:
        per = []
        for step, path, a in cks:
            proj = projection_fraction(a, biased, unbiased)
            per.append({"step": step, "dir": path, "layers": {str(k): v for k, v in proj.items()}})
            records += [{"series": f"{_slug(s)} L{k}", "step": step, "value": v["fraction"], "layer": k,
                         "group": _slug(s)}
                        for k, v in proj.items()]
        table["students"][s] = per
    write_json_atomic(out / "direction.json", table, nan_as_null=True)
    if records:
        layers = sorted({r["layer"] for r in records})
        show = set(layers if len(layers) <= 6 else [layers[round(i * (len(layers) - 1) / 5)] for i in range(6)])
        write_json_atomic(out / "transfer.json", {"ylabel": "fraction along the teacher's bias direction",
                                                   "records": records}, nan_as_null=True)
        plots.plot_transfer([r for r in records if r["layer"] in show], out / "transfer.png",
                            ylabel="fraction along the teacher's bias direction")


def vars_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k != "func"}


# ---------------------------------------------------------------------------------------- patch


def run_patch(args: argparse.Namespace) -> int:
    """``subliminal patch``. One process patches row by row, appending each finished row to
    ``sites.jsonl`` (resume per row). Under a launcher the sites are sharded: see
    :func:`_patch_sharded`; the outputs are the same."""
    from subliminal.models import load_model, same_tokenizer

    from .activations import load_data_rows, n_layers_of, resolve_layers

    t0 = time.time()
    set_seed(args.seed)
    dist.init(args.device)
    out = Path(args.out)
    config = {k: v for k, v in vars_config(args).items() if k not in ("bootstrap",)}
    done_path = out / "sites.jsonl"
    fp_path = out / PATCH_FINGERPRINT
    with dist.agree("check"):
        fp = stage_fingerprint(args)
        action = _resume_action(args, out, "patch", fp, partial=fp_path)
    if action == "skip":
        if dist.is_main():
            print(f"{out}: already patched by this exact command; nothing to do (--overwrite redoes it)")
        return 0
    with dist.agree("prepare"):
        f = load_model(args.models[0], **runtime_kwargs(args))
        c = load_model(args.models[1], **runtime_kwargs(args))
        if not same_tokenizer(f.tokenizer, c.tokenizer):
            raise SubliminalError("the two teachers have different vocabularies; logits cannot be compared")
        if n_layers_of(f.model) != n_layers_of(c.model):
            raise SubliminalError("the two teachers have different numbers of layers")
        layers = resolve_layers(args.layers, n_layers_of(f.model))
        rows = load_data_rows(args.data, args.max_rows)
    with dist.agree("open"):
        if dist.is_main():
            if action == "start":
                done_path.unlink(missing_ok=True)
            write_fingerprint(fp_path, fp)
            write_manifest(out, stage="patch", config=config, seed=args.seed, inputs={"data": args.data},
                           extra={"complete": False})
    if dist.is_distributed():
        sites, interp_used = _patch_sharded(args, f, c, rows, layers, done_path)
    else:
        sites, interp_used = _patch_rows(args, f, c, rows, layers, done_path)
    with dist.agree("summary"):
        if dist.is_main():
            _patch_finish(args, out, config, layers, rows, sites, interp_used, t0, fp)
            fp_path.unlink(missing_ok=True)
    return 0


PATCH_FINGERPRINT = ".fingerprint.json"  # the fingerprint of an unfinished patch run (sites.jsonl resumes it)


def _sites_of_records(records: list[dict[str, Any]]) -> tuple[list, set]:
    """The Site objects and interpolation flags of ``sites.jsonl`` records (JSON keys back to ints)."""
    from .patching import Site

    sites, interp_used = [], set()
    for r in records:
        sites += [Site(**{**s, **{k: {int(a): b for a, b in s[k].items()}
                                  for k in ("restore", "destroy", "attribution")}}) for s in r["sites"]]
        if "interpolated" in r:
            interp_used.add(r["interpolated"])
    return sites, interp_used


def _patch_rows(args: argparse.Namespace, f: Any, c: Any, rows: list, layers: list[int], done_path: Path
                ) -> tuple[list, set]:
    """One process: patch row by row in order until ``--max-sites``, appending each row's record."""
    from tqdm.auto import tqdm

    from subliminal.data import JsonlAppender

    from .patching import attribute_site, divergence_sites, patch_site, prepare_row

    with JsonlAppender(done_path) as app:
        done = {r["row"]: r for r in app.existing()}
        sites, interp_used = _sites_of_records(list(done.values()))
        bar = tqdm(rows, desc="patching", leave=False)
        for row, _obj, _where in bar:
            if len(sites) >= args.max_sites:
                break
            if row.id in done:
                continue
            run = prepare_row(f, c, row)
            new = divergence_sites(run, rule=args.rule)[: args.max_sites - len(sites)]
            flag = None
            for s in new:
                patch_site(f, c, run, s, layers, span=args.span)
                if args.attr_steps > 0:
                    flag = attribute_site(f, c, run, s, layers, steps=args.attr_steps, span=args.span)
                    interp_used.add(flag)
            app.write({"row": row.id, "sites": [s.to_json() for s in new], "interpolated": flag})
            sites += new
            bar.set_postfix(sites=len(sites))
    return sites, interp_used


def _select_sites(n_done: int, counts: dict[int, int], order: list[int], max_sites: int
                  ) -> list[tuple[int, int]]:
    """The ``(row index, number of its sites taken)`` a one-process run records, in row order:
    rows are taken while fewer than ``max_sites`` sites are in hand (``n_done`` from a resumed
    run), the last one truncated to the budget. ``counts`` may lack rows past the budget."""
    taken, have = [], n_done
    for i in order:
        if have >= max_sites:
            break
        k = min(counts[i], max_sites - have)
        taken.append((i, k))
        have += k
    return taken


def _patch_sharded(args: argparse.Namespace, f: Any, c: Any, rows: list, layers: list[int], done_path: Path
                   ) -> tuple[list, set]:
    """Under a launcher. Phase 1 (cheap: two forwards per row): each rank finds the divergence
    sites of its contiguous shard of the rows still to do, stopping once its own shard alone
    fills the ``--max-sites`` budget; every rank then knows which sites a one-process run would
    patch. Phase 2 (the expensive part: 2 x layers forwards and the attribution passes per
    site): those sites are split contiguously over the ranks, each re-runs the few rows its
    sites belong to and patches them. Rank 0 merges in row order and appends the rows' records
    to ``sites.jsonl`` exactly as one process writes them. A run interrupted before the merge
    leaves nothing behind but the records of an earlier one-process run, which it resumes from."""
    from tqdm.auto import tqdm

    from subliminal.data import JsonlAppender

    from .patching import Site, attribute_site, divergence_sites, patch_site, prepare_row

    done = {r["row"]: r for r in dist.read_complete_lines(done_path)}
    sites, interp_used = _sites_of_records(list(done.values()))
    todo = [i for i, (row, _o, _w) in enumerate(rows) if row.id not in done]
    budget = args.max_sites - len(sites)
    mine = dist.shard(len(todo))
    counts: dict[int, int] = {}
    with dist.agree("find-sites"):
        have = 0
        for j in tqdm(mine, desc="finding sites", leave=False, disable=dist.progress_disabled()):
            if have >= budget:
                break
            i = todo[j]
            counts[i] = len(divergence_sites(prepare_row(f, c, rows[i][0]), rule=args.rule)[:max(budget, 0)])
            have += counts[i]
    for part in dist.all_gather(counts):
        counts.update(part)
    taken = _select_sites(len(sites), counts, todo, args.max_sites)
    flat = [(i, k) for i, n in taken for k in range(n)]
    share = dist.shard(len(flat))
    patched: list[tuple[int, int, dict[str, Any], Any]] = []
    with dist.agree("patch"):
        cached: tuple[int, Any, list[Site]] | None = None
        for i, k in tqdm([flat[j] for j in share], desc="patching", leave=False, disable=dist.progress_disabled()):
            if cached is None or cached[0] != i:
                run = prepare_row(f, c, rows[i][0])
                cached = (i, run, divergence_sites(run, rule=args.rule))
            _, run, row_sites = cached
            s = row_sites[k]
            patch_site(f, c, run, s, layers, span=args.span)
            flag = (attribute_site(f, c, run, s, layers, steps=args.attr_steps, span=args.span)
                    if args.attr_steps > 0 else None)
            patched.append((i, k, s.to_json(), flag))
    gathered = dist.gather_to_main(patched)
    with dist.agree("merge"):
        if gathered is not None:
            by_row: dict[int, list[tuple[dict[str, Any], Any]]] = {}
            for i, _k, sj, flag in dist.merge_in_order(gathered):
                by_row.setdefault(i, []).append((sj, flag))
            with JsonlAppender(done_path) as app:
                for i, _n in taken:
                    got = by_row.get(i, [])
                    new = [Site(**sj) for sj, _ in got]
                    flag = got[-1][1] if got else None
                    if args.attr_steps > 0:
                        interp_used.update(fl for _, fl in got)
                    app.write({"row": rows[i][0].id, "sites": [s.to_json() for s in new], "interpolated": flag})
                    sites += new
    return sites, interp_used


def _patch_finish(args: argparse.Namespace, out: Path, config: dict[str, Any], layers: list[int], rows: list,
                  sites: list, interp_used: set, t0: float, fp: dict[str, Any]) -> None:
    """Rank 0: the summary with bootstrap intervals, the figure and the final manifest."""
    from .patching import summarise

    summary = summarise(sites, layers, n_boot=args.bootstrap, seed=args.seed)
    summary.update({"models": args.models, "span": args.span, "rule": args.rule, "attr_steps": args.attr_steps,
                    "attribution_interpolated": sorted(x for x in interp_used if x is not None)})
    if args.attr_steps > 1 and False in interp_used:
        summary["note"] = ("inputs of different length under the two teachers: attribution used the plain "
                           "gradient at the counterfactual run for those sites")
    write_json_atomic(out / "patching.json", summary, nan_as_null=True)
    if sites:
        plots.plot_patch(summary, out / "patching.png")
    else:
        log.warning("no divergence sites found in %d rows; nothing to patch", len(rows))
    n_sites = len(sites)
    write_manifest(out, stage="patch", config=config, seed=args.seed, inputs={"data": args.data,
                   "factual": args.models[0], "counterfactual": args.models[1]}, wall_time_s=time.time() - t0,
                   extra={"complete": True, "fingerprint": fp, "n_sites": n_sites, **dist.shard_record(n_sites),
                          "sharding": "sites split contiguously over the ranks in row order (rows scanned for "
                                      "sites in contiguous shards first); rank 0 merges and summarises"})
    ag = summary["agreement"]
    log.info("patched %d sites in %d rows; attribution vs patching r=%.3f -> %s", len(sites), summary["n_rows"],
             ag["pearson_site_layer"], out / "patching.json")


# ----------------------------------------------------------------------------------------- plot


def run_plot(args: argparse.Namespace) -> int:
    fn = {"probe": plots.plot_probe, "patch": plots.plot_patch, "ablation": plots.plot_ablation,
          "transfer": plots.plot_transfer, "conditions": plots.plot_conditions}
    if args.kind == "heatmap":
        out = plots.plot_heatmap(args.input, args.out, rows=args.rows, score=args.score, ids=args.ids)
    else:
        out = fn[args.kind](args.input, args.out)
    print(out)
    return 0
