"""Speed and memory of subliminal.kernels' divergence scoring, beside the anchors.

On a CUDA machine (the real benchmark):
    python benchmarks/bench_divergence.py --anchor ../shared/bench/divergence_anchor.py --out BENCHMARKS.md
runs the anchor script (PyTorch eager, torch.compile, Liger JSD, memory-bandwidth floor) as a
subprocess first, so it has the GPU memory to itself, then in this process:
  - the streaming logits kernel without and with Jensen-Shannon, K = 1, on the anchor's shapes
    (same input recipe: bf16, factual = 3 * randn, counterfactual = factual + 0.3 * randn);
  - K = 1 against K = 12 counterfactuals on one shape (the factual row is read once);
  - the fused-linear kernel (d = 3584, V = 151936) against the two matmuls it replaces (and
    against matmuls + the logits kernel), with peak extra memory;
each timed with triton.testing.do_bench (median and inter-quartile range over >= 10 repeats),
checked against the float64 torch reference on the first rows, printed as JSON lines and
written to a markdown table (--out) with the device and versions.

On a CPU, --dry-run does the same with tiny shapes (torch reference and the Triton kernels
under TRITON_INTERPRET=1) so the script is known to execute; its numbers say nothing about
GPU speed and the markdown it writes says so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ANCHOR = REPO.parent / "shared" / "bench" / "divergence_anchor.py"

GPU_LOGIT_SHAPES = [(4096, 32000), (8192, 151936), (16384, 151936)]  # the anchor's shapes, K = 1
GPU_K_SHAPE = (8192, 151936)  # K = 1 vs K = 12: 13 bf16 teachers = 32 GB
GPU_FUSED = [(4096, 151936, 3584), (16384, 151936, 3584)]  # (N, V, d) of a 7B teacher
DRY_LOGIT_SHAPES = [(13, 500)]
DRY_K_SHAPE = (5, 129)
DRY_FUSED = [(20, 130, 32)]
# (K, BLOCK_V, VEC, num_warps, num_stages) of the logits kernel; the defaults are (1, 2048, 8, 8, 2)
# and (12, 1024, 8, 4, 2). VEC = 16 is two 16-byte loads per lane.
GPU_SWEEP = [(1, 1024, 8, 4, 2), (1, 2048, 8, 8, 2), (1, 2048, 8, 4, 2), (1, 4096, 8, 8, 2), (1, 4096, 16, 8, 2),
             (1, 4096, 8, 16, 2), (1, 8192, 16, 16, 2), (1, 2048, 8, 8, 1), (1, 2048, 8, 8, 3),
             (12, 1024, 8, 4, 1), (12, 2048, 8, 8, 1), (12, 1024, 8, 4, 2), (12, 512, 8, 2, 1)]
# --sweep short (benchmarks/gpu_session.sh, a bounded device call): each default and its nearest
# neighbours (block size, warps, stages), 7 configurations instead of 13.
GPU_SWEEP_SHORT = [(1, 2048, 8, 8, 2), (1, 4096, 8, 8, 2), (1, 2048, 8, 4, 2), (1, 4096, 16, 8, 2),
                   (12, 1024, 8, 4, 2), (12, 1024, 8, 4, 1), (12, 2048, 8, 8, 1)]
DRY_SWEEP = [(1, 128, 4, 4, 1), (1, 512, 8, 8, 2), (3, 64, 1, 2, 1)]
DRY_SWEEP_SHORT = [(1, 512, 8, 8, 2), (3, 64, 1, 2, 1)]
K_MANY = 12
CHECK_ROWS = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: checks the script runs")
    p.add_argument("--anchor", type=Path, default=DEFAULT_ANCHOR, help="path of divergence_anchor.py")
    p.add_argument("--no-anchor", action="store_true", help="skip the anchor subprocess")
    p.add_argument("--anchor-timeout", type=float, default=420.0, help="seconds allowed for the anchor script")
    p.add_argument("--out", type=Path, default=None, help="markdown table to write (e.g. BENCHMARKS.md)")
    p.add_argument("--json", type=Path, default=None, help="also write the JSON lines here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-fused", action="store_true", help="skip the fused-linear benchmark")
    p.add_argument("--block-v", type=int, default=None, help="override the logits kernel's BLOCK_V (tuning)")
    p.add_argument("--vec", type=int, default=None, help="override the logits kernel's ids per lane (tuning)")
    p.add_argument("--num-warps", type=int, default=None, help="override the logits kernel's num_warps (tuning)")
    p.add_argument("--num-stages", type=int, default=None, help="override the logits kernel's num_stages (tuning)")
    p.add_argument("--sweep", nargs="?", const="full", default=None, choices=["full", "short"],
                   help="also time the logits kernel (no JS, largest shape, K = 1 and 12) for several launch "
                        "configurations (BLOCK_V, VEC, num_warps, num_stages); 'short': each default and its "
                        "nearest neighbours only")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- measurement

def time_fn(fn: Callable[[], object], device: str, cpu_repeats: int = 2) -> dict:
    """Median and inter-quartile range (ms) over repeats: do_bench on CUDA (>= ~10 repeats),
    wall clock on CPU."""
    if device == "cuda":
        import torch
        import triton

        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3
        times = triton.testing.do_bench(fn, warmup=max(25, int(2 * est_ms)), rep=max(100, int(20 * est_ms)),
                                        return_mode="all")
    else:
        fn()
        times = []
        for _ in range(cpu_repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times = sorted(float(t) for t in times)
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": round(statistics.median(times), 4), "p25_ms": round(q[0], 4), "p75_ms": round(q[2], 4),
            "repeats": len(times)}


def peak_extra_gib(fn: Callable[[], object], device: str) -> float | None:
    """Peak memory allocated during one call beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return round((peak - base) / 2**30, 4)


def copy_bandwidth_tbs(device: str) -> float | None:
    """Device-to-device copy bandwidth (read + write of 1 GiB), the anchor's floor definition."""
    if device != "cuda":
        return None
    import torch
    import triton

    x = torch.empty(2**30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * 2**30 / (t * 1e-3) / 1e12


# ----------------------------------------------------------------------------- inputs / checks

def make_logits(n: int, v: int, k: int, device: str, seed: int):
    """The anchor's recipe: bf16 factual = 3 randn, counterfactual = factual + 0.3 randn (K of them)."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    lf = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=g) * 3
    lc = torch.empty(k, n, v, device=device, dtype=torch.bfloat16)
    for j in range(k):
        lc[j] = lf + 0.3 * torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=g)
    tok = torch.randint(0, v, (n,), device=device, generator=g)
    return lf, lc, tok


def compare(got: dict, want: dict) -> dict:
    """Max abs error of the float outputs (finite entries) and exact-match rate of the integer ones."""
    import torch

    out = {}
    for key, w in want.items():
        g = got[key]
        if w.dtype == torch.int64:
            out[f"{key}_match"] = round(float((g == w).double().mean()), 6)
        else:
            fin = torch.isfinite(w)
            err = (g.double()[fin] - w.double()[fin]).abs()
            out[f"{key}_maxerr"] = float(err.max()) if err.numel() else 0.0
    return out


def check_logits(lf, lc, tok, backend: str, **kw) -> dict:
    """Our kernel vs the float64 torch reference on the first CHECK_ROWS rows."""
    from subliminal.kernels import divergence_stats

    r = slice(0, min(CHECK_ROWS, lf.shape[0]))
    got = divergence_stats(lf[r], lc[:, r], tok[r], backend=backend, **kw)
    want = divergence_stats(lf[r].double(), lc[:, r].double(), tok[r], backend="torch", **kw)
    return compare(got, want)


# ----------------------------------------------------------------------------- benchmarks

def record(rows: list[dict], json_path: Path | None, **fields) -> None:
    rows.append(fields)
    line = json.dumps(fields)
    print(line, flush=True)
    if json_path is not None:
        with json_path.open("a") as fh:
            fh.write(line + "\n")


def bench_logits(rows: list[dict], args: argparse.Namespace, device: str, bw: float | None) -> None:
    """Logits kernel (and on the CPU the torch reference) without / with JS, K = 1, then K = 1 vs 12."""
    from subliminal.kernels import divergence_stats

    backends = ["triton"] if device == "cuda" else ["torch", "triton"]
    tune = {"block_v": args.block_v, "vec": args.vec, "num_warps": args.num_warps, "num_stages": args.num_stages}
    shapes = GPU_LOGIT_SHAPES if device == "cuda" else DRY_LOGIT_SHAPES
    plan = [(n, v, 1) for n, v in shapes] + [(GPU_K_SHAPE if device == "cuda" else DRY_K_SHAPE) + (k,)
                                             for k in (1, K_MANY)]
    for n, v, k in plan:
        lf, lc, tok = make_logits(n, v, k, device, args.seed)
        floor = None if bw is None else (1 + k) * n * v * lf.element_size() / (bw * 1e12) * 1e3
        for backend in backends:
            kw = tune if backend == "triton" and device == "cuda" else {}
            if backend == "triton" and device == "cuda":
                from subliminal.kernels.divergence_triton import divergence_stats_triton

                def run(js: bool, lf=lf, lc=lc, tok=tok, kw=kw):
                    return divergence_stats_triton(lf, lc, tok, with_js=js, **kw)
            else:
                def run(js: bool, lf=lf, lc=lc, tok=tok, backend=backend):
                    return divergence_stats(lf, lc, tok, backend=backend, with_js=js)
            for js in (False, True):
                if k == K_MANY and js:
                    continue
                t = time_fn(lambda js=js, run=run: run(js), device)
                mem = peak_extra_gib(lambda js=js, run=run: run(js), device)
                check = check_logits(lf, lc, tok, "triton", with_js=js) if backend == "triton" else {}
                record(rows, args.json, bench="logits", method=f"ours-{backend}", js=js, N=n, V=v, K=k,
                       dtype="bf16", **t, extra_GiB=mem,
                       floor_ms=None if floor is None else round(floor, 4),
                       x_floor=None if floor is None else round(t["median_ms"] / floor, 2), **check)
        del lf, lc, tok
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()


def bench_sweep(rows: list[dict], args: argparse.Namespace, device: str, bw: float | None) -> None:
    """Launch-configuration sweep of the logits kernel, to choose its defaults on a new GPU."""
    from subliminal.kernels.divergence_triton import divergence_stats_triton

    n, v = (GPU_LOGIT_SHAPES if device == "cuda" else DRY_LOGIT_SHAPES)[-1]
    short = args.sweep == "short"
    plan = (GPU_SWEEP_SHORT if short else GPU_SWEEP) if device == "cuda" else (DRY_SWEEP_SHORT if short else DRY_SWEEP)
    for k in sorted({p[0] for p in plan}):
        nk = n if k == 1 else (GPU_K_SHAPE[0] if device == "cuda" else DRY_K_SHAPE[0])
        lf, lc, tok = make_logits(nk, v, k, device, args.seed)
        floor = None if bw is None else (1 + k) * nk * v * lf.element_size() / (bw * 1e12) * 1e3
        for _, bv, vec, warps, stages in (p for p in plan if p[0] == k):
            def run(bv=bv, vec=vec, warps=warps, stages=stages, lf=lf, lc=lc, tok=tok):
                return divergence_stats_triton(lf, lc, tok, with_js=False, block_v=bv, vec=vec, num_warps=warps,
                                               num_stages=stages)
            t = time_fn(run, device)
            record(rows, args.json, bench="sweep", method="ours-triton", js=False, N=nk, V=v, K=k, block_v=bv,
                   vec=vec, num_warps=warps, num_stages=stages, **t,
                   floor_ms=None if floor is None else round(floor, 4),
                   x_floor=None if floor is None else round(t["median_ms"] / floor, 2))
        del lf, lc, tok
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()


def fused_inputs(n: int, v: int, d: int, device: str, seed: int):
    """bf16 hidden states of two teachers (close), a shared unembedding and a perturbed copy."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    dt = torch.bfloat16
    h = torch.randn(n, d, device=device, dtype=dt, generator=g)
    hc = (h.float() + 0.3 * torch.randn(n, d, device=device, generator=g)).to(dt)
    w = (torch.randn(v, d, device=device, generator=g) / d ** 0.5).to(dt)
    w2 = (w.float() + 0.01 * torch.randn(v, d, device=device, generator=g) / d ** 0.5).to(dt)
    tok = torch.randint(0, v, (n,), device=device, generator=g)
    return h, hc, w, w2, tok


def bench_fused_shape(rows: list[dict], args: argparse.Namespace, device: str, n: int, v: int, d: int) -> None:
    """One (N, V, d): two matmuls, matmuls + logits kernel, fused (no JS / JS / separate weights)."""
    from subliminal.kernels import divergence_stats, fused_linear_divergence_stats

    h, hc, w, w2, tok = fused_inputs(n, v, d, device, args.seed)

    def matmuls():
        return h @ w.T, hc @ w.T

    def materialised():
        lf, lc = matmuls()
        return divergence_stats(lf, lc, tok, backend="triton", with_js=False)

    def fused(js: bool, wc=w):
        return fused_linear_divergence_stats(h, w, hc, wc, tok, backend="triton", with_js=js)

    r = slice(0, min(CHECK_ROWS, n))
    w64 = w.double()
    want = divergence_stats(h[r].double() @ w64.T, hc[r].double() @ w64.T, tok[r], backend="torch")
    del w64
    cases = [("two-matmuls", matmuls, None, "shared"),
             ("matmuls+logits-kernel", materialised, False, "shared"),
             ("ours-fused", lambda: fused(False), False, "shared"),
             ("ours-fused", lambda: fused(True), True, "shared"),
             ("ours-fused", lambda: fused(False, w2), False, "separate")]
    for name, fn, js, weights in cases:
        t = time_fn(fn, device, cpu_repeats=2)
        mem = peak_extra_gib(fn, device)
        check = {}
        if name == "ours-fused" and weights == "shared":
            got = fused_linear_divergence_stats(h[r], w, hc[r], w, tok[r], backend="triton", with_js=bool(js))
            check = compare(got, {key: val for key, val in want.items() if key in got})
        record(rows, args.json, bench="fused-linear", method=name, js=js, weights=weights, N=n, V=v, d=d, K=1,
               dtype="bf16", **t, extra_GiB=mem, **check)


def bench_fused(rows: list[dict], args: argparse.Namespace, device: str) -> None:
    """Fused-linear kernel vs the two matmuls it replaces (and matmuls + logits kernel)."""
    for n, v, d in (GPU_FUSED if device == "cuda" else DRY_FUSED):
        bench_fused_shape(rows, args, device, n, v, d)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()


def run_anchor(path: Path, timeout: float) -> tuple[list[dict], str]:
    """Run the anchor script; return its JSON rows and a one-line status (bandwidth or error)."""
    if not path.exists():
        return [], f"anchor script not found at {path}"
    try:
        proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"anchor script timed out after {timeout:.0f} s"
    out = []
    status = f"anchor exit code {proc.returncode}"
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            row = json.loads(line)
            row["bench"] = "anchor"
            out.append(row)
            print(json.dumps(row), flush=True)
        elif line.startswith("copy bandwidth"):
            status += f"; {line}"
        elif line:
            status += f"; {line[:200]}"
    if proc.returncode != 0:
        status += "; stderr: " + proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
    return out, status


# ----------------------------------------------------------------------------- report

def fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def check_text(r: dict) -> str:
    """Compact correctness column: worst integer match rate and worst float error vs float64."""
    matches = [v for k, v in r.items() if k.endswith("_match")]
    errs = [v for k, v in r.items() if k.endswith("_maxerr")]
    if not matches and not errs:
        return "-"
    return f"ids/ranks match {fmt(min(matches))}, max err {max(errs):.2g}"


def summary(rows: list[dict], anchor_rows: list[dict]) -> list[str]:
    """Ratios against the issue's goals, computed from the rows above (nothing when absent)."""
    out = []
    ours = {(r["N"], r["V"], r["K"], r["js"]): r["median_ms"] for r in rows
            if r["bench"] == "logits" and r["method"] == "ours-triton"}
    for a in anchor_rows:
        key = (a.get("N"), a.get("V"), 1, False)
        if key in ours and a.get("floor_ms"):
            t = ours[key]
            tj = ours.get((a["N"], a["V"], 1, True))
            out.append(f"- N={a['N']} V={a['V']}: ours {t:.3g} ms = {t / a['floor_ms']:.2f}x the anchor floor "
                       f"(goal <= 1.25x); {a['compile_ms'] / t:.1f}x faster than torch.compile (goal >= 9x), "
                       f"{a['eager_ms'] / t:.1f}x faster than eager (goal >= 35x)"
                       + (f"; with JS {tj / a['floor_ms']:.2f}x the floor (goal <= 1.6x)" if tj else ""))
    for (n, v, k, js), t in ours.items():
        if k == K_MANY and (n, v, 1, js) in ours:
            t1 = ours[(n, v, 1, js)]
            out.append(f"- N={n} V={v}: K={K_MANY} takes {t / t1:.2f}x the K=1 time (goal < {K_MANY}x)")
    return (["", "## Against the goals", ""] + out) if out else []


def markdown(meta: dict, rows: list[dict], anchor_rows: list[dict], anchor_status: str) -> str:
    lines = ["# Benchmarks: divergence scoring kernels", ""]
    if meta["dry_run"]:
        lines += ["**DRY RUN on the CPU** (tiny shapes, Triton interpreter): these numbers only show that "
                  "`benchmarks/bench_divergence.py` executes; they say nothing about GPU speed.", ""]
    lines += [f"- device: {meta['device']}", f"- torch {meta['torch']}, triton {meta['triton']}",
              f"- copy bandwidth (this process): {fmt(meta['bandwidth_tbs'])} TB/s; anchor: {anchor_status}",
              f"- command: `{meta['command']}`", f"- date (UTC): {meta['date']}",
              "- times: median over repeats, spread = inter-quartile range (p25-p75); memory: peak allocated "
              "during one call beyond what was allocated before it",
              "- static SASS instruction counts of the same kernels (compiled for sm_90, no GPU needed): "
              "`benchmarks/kernel_sass.md`, made by `python benchmarks/kernel_sass.py --out benchmarks/kernel_sass.md`",
              ""]
    lines += ["## Logits kernel (bf16 inputs)", "",
              "| method | JS | N | V | K | median ms | p25-p75 ms | x floor | floor ms | extra GiB | check |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "logits":
            continue
        lines.append(f"| {r['method']} | {r['js']} | {r['N']} | {r['V']} | {r['K']} | {fmt(r['median_ms'])} | "
                     f"{fmt(r['p25_ms'])}-{fmt(r['p75_ms'])} | {fmt(r['x_floor'])} | {fmt(r['floor_ms'])} | "
                     f"{fmt(r['extra_GiB'])} | {check_text(r)} |")
    if anchor_rows:
        lines += ["", "## Anchors (divergence_anchor.py, same call, K = 1; medians only)", "",
                  "| N | V | floor ms | eager ms | compile ms | Liger JSD ms | eager extra GiB | compile extra GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for a in anchor_rows:
            lines.append(f"| {a.get('N')} | {a.get('V')} | {fmt(a.get('floor_ms'))} | {fmt(a.get('eager_ms'))} | "
                         f"{fmt(a.get('compile_ms'))} | {fmt(a.get('liger_jsd_ms'))} | "
                         f"{fmt(a.get('eager_extra_GiB'))} | {fmt(a.get('compile_extra_GiB'))} |")
    sweep = [r for r in rows if r["bench"] == "sweep"]
    if sweep:
        lines += ["", "## Launch-configuration sweep (logits kernel, no JS)", "",
                  "| N | V | K | BLOCK_V | VEC | num_warps | num_stages | median ms | p25-p75 ms | x floor |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['N']} | {r['V']} | {r['K']} | {r['block_v']} | {r['vec']} | {r['num_warps']} | "
                  f"{r['num_stages']} | {fmt(r['median_ms'])} | {fmt(r['p25_ms'])}-{fmt(r['p75_ms'])} | "
                  f"{fmt(r['x_floor'])} |" for r in sweep]
    if not meta["dry_run"]:
        lines += summary(rows, anchor_rows)
    lines += ["", "## Fused linear (hidden states + unembedding, bf16)", "",
              "| method | JS | weights | N | V | d | median ms | p25-p75 ms | extra GiB | check |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["bench"] != "fused-linear":
            continue
        lines.append(f"| {r['method']} | {fmt(r['js'])} | {r['weights']} | {r['N']} | {r['V']} | {r['d']} | "
                     f"{fmt(r['median_ms'])} | {fmt(r['p25_ms'])}-{fmt(r['p75_ms'])} | {fmt(r['extra_GiB'])} | "
                     f"{check_text(r)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # must precede the first import of the Triton kernel modules (jit mode is fixed at import)
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton

    if args.dry_run:
        torch.set_num_threads(1)  # tiny tensors: thread start-up would dominate on a shared CPU

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text("")
    anchor_rows, anchor_status = [], "not run"
    if not args.no_anchor and not args.dry_run:
        anchor_rows, anchor_status = run_anchor(args.anchor, args.anchor_timeout)
    elif args.dry_run:
        anchor_status = "not run in --dry-run (needs CUDA)"
    rows: list[dict] = []
    bw = copy_bandwidth_tbs(device)
    bench_logits(rows, args, device, bw)
    if args.sweep:
        bench_sweep(rows, args, device, bw)
    if not args.skip_fused:
        bench_fused(rows, args, device)
    meta = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if device == "cuda" else "CPU",
            "torch": torch.__version__, "triton": triton.__version__,
            "bandwidth_tbs": None if bw is None else round(bw, 3),
            "command": "python benchmarks/bench_divergence.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(markdown(meta, rows, anchor_rows, anchor_status))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
