"""Compile the Triton kernels for an H100 (sm_90) without a GPU and count what the GPU would run.

Why: the CPU tests run the kernels through Triton's interpreter, which accepts programs the real
compiler rejects and says nothing about cost. This script lowers each kernel, at the launch
configurations the wrappers choose for CUDA and with the argument specialisation a real launch
gets (16-byte aligned pointers, sizes and strides divisible by 16), through Triton's full
pipeline to a cubin (Triton bundles ptxas, cuobjdump and nvdisasm), and reports per
configuration: registers and spill stack per thread, shared memory, whether `tl.dot` became
tensor-core instructions, and for each vocabulary loop the SASS instructions per iteration,
with the barriers, warp shuffles, special-function (exp/log) and load instructions among them.

These are static counts, not timings. They matter because the logits kernel aims at the memory
bandwidth floor: on an H100 every SM must stream ~(1 + K) * 2 bytes per logit while issuing at
most 4 warp-instructions per cycle, so instructions per logit bound the speed once they exceed
the bandwidth's share (see BENCHMARKS.md). Timings need the GPU: bench_divergence.py.

Usage:
    python benchmarks/kernel_sass.py                   # JSON lines, exit 0 iff all compile
    python benchmarks/kernel_sass.py --out benchmarks/kernel_sass.md
Must run without TRITON_INTERPRET (the kernel modules must be compiled-mode JITFunctions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
OUT_TYPES = {"am_f_ptr": "*i64", "am_c_ptr": "*i64", "rank_ptr": "*i64", "tok_ptr": "*i64",
             "status_f_ptr": "*i32", "status_c_ptr": "*i32"}
INPUT_PTRS = ("f_ptr", "c_ptr", "hf_ptr", "wf_ptr", "hc_ptr", "wc_ptr")
BIG_V, BIG_D = 151936, 3584  # Qwen-2.5 vocabulary, a 7B model's width


def signature(kernel, in_type: str, constexprs: dict) -> dict:
    """Kernel signature: input pointers `in_type`, outputs by name, other runtime ints i32."""
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{in_type}" if name in INPUT_PTRS else OUT_TYPES.get(name, "*fp32")
        else:
            sig[name] = "i32"
    missing = {n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr} - set(constexprs)
    assert not missing, f"constexprs not given: {missing}"
    return sig


def launch_attrs(kernel, sig: dict, ints: dict) -> dict:
    """What a real launch specialises on: every pointer 16-byte aligned (torch allocations are),
    each integer argument divisible by 16 when its value for this configuration is."""
    attrs = {}
    for i, name in enumerate(kernel.arg_names):
        if sig[name] == "constexpr":
            continue
        if name.endswith("_ptr") or ints.get(name, 1) % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def resources(cubin: bytes) -> dict:
    """Registers, spill stack and local memory per thread from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-res-usage", fh.name], capture_output=True, text=True,
                              check=True).stdout
    reg, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return {"registers": int(reg.group(1)) if reg else None, "stack_bytes": int(stack.group(1)) if stack else None}


OPCODE = re.compile(r"^\s*/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
LABEL = re.compile(r"^(\.L_x_\d+):")
BACK_BRANCH = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")


def sass_loops(cubin: bytes) -> list[dict]:
    """Instruction counts of each loop body (a label reached again by a later branch)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        lines = subprocess.run([str(TOOLS / "nvdisasm"), "-c", fh.name], capture_output=True, text=True,
                               check=True).stdout.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := LABEL.match(line.strip()))}
    loops = []
    for i, line in enumerate(lines):
        m = BACK_BRANCH.search(line)
        if not m or m.group(1) not in labels or labels[m.group(1)] >= i:
            continue
        ops = [o.group(1) for x in lines[labels[m.group(1)]:i + 1] if (o := OPCODE.match(x))]
        if len(ops) < 8:  # the trap loop at the end of every kernel
            continue
        loops.append({"instructions": len(ops), "barriers": ops.count("BAR"), "shuffles": ops.count("SHFL"),
                      "mufu": ops.count("MUFU"), "loads": sum(o.startswith(("LDG", "LDGSTS")) for o in ops)})
    return loops


def compile_one(kernel, in_type: str, constexprs: dict, num_warps: int, ints: dict) -> tuple[dict, object]:
    sig = signature(kernel, in_type, constexprs)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=launch_attrs(kernel, sig, ints))
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    assert "cubin" in compiled.asm, "no cubin produced"
    return {"shared_bytes": compiled.metadata.shared, "uses_mma": "mma" in compiled.asm["ptx"],
            **resources(compiled.asm["cubin"])}, compiled


def logits_configs() -> list[dict]:
    from subliminal.kernels import divergence_triton as dt

    out = []
    for in_type, n, v, k, js in (("bf16", 16384, BIG_V, 1, False), ("bf16", 16384, BIG_V, 1, True),
                                 ("bf16", 8192, BIG_V, 12, False), ("bf16", 16384, 50257, 1, False),
                                 ("fp32", 16384, 32000, 1, False), ("fp16", 37, 7, 3, True), ("fp32", 1, 1, 1, True)):
        elem = {"bf16": 2, "fp16": 2, "fp32": 4}[in_type]
        aligned = (v * elem) % 16 == 0 and (n * v * elem) % 16 == 0
        cfg = dt.launch_config(n, v, k, elem_bytes=elem, aligned=aligned)
        out.append({"kernel": dt._divergence_kernel, "dtype": in_type, "N": n, "V": v, "K": k, "js": js,
                    "num_warps": cfg.num_warps, "ints": {"N": n, "V": v, "stride_fn": v, "stride_cn": v,
                                                          "stride_ck": n * v, "V_FULL": v // cfg.block_v * cfg.block_v},
                    "constexprs": {"K": k, "ROWS": cfg.rows, "LANES": cfg.lanes, "VEC": cfg.vec,
                                   "N_TILES": dt.n_tiles(v, cfg.block_v), "WITH_JS": js,
                                   "NUM_STAGES": cfg.num_stages, "FAST_LOG": True},
                    "ids_per_thread": cfg.rows * cfg.block_v / (32 * cfg.num_warps)})
    return out


def fused_configs() -> list[dict]:
    from subliminal.kernels import fused_linear as fl

    out = []
    for in_type, n, v, d, k, js, bias in (("bf16", 16384, BIG_V, BIG_D, 1, False, False),
                                          ("bf16", 4096, BIG_V, BIG_D, 3, True, True),
                                          ("fp32", 5, 37, 24, 2, True, True)):
        rows, bv, bd, warps = fl.fused_block_sizes(n, v, d)
        out.append({"kernel": fl._fused_linear_kernel, "dtype": in_type, "N": n, "V": v, "K": k, "js": js, "d": d,
                    "num_warps": warps, "ints": {"N": n, "V": v, "D": d, "K": k, "stride_hf_n": d, "stride_wf_v": d,
                                                 "stride_hc_k": n * d, "stride_hc_n": d, "stride_wc_k": 0,
                                                 "stride_wc_v": d, "stride_bc_k": 0},
                    "constexprs": {"K_PAD": triton.next_power_of_2(k), "ROWS": rows, "BLOCK_V": bv, "BLOCK_D": bd,
                                   "HAS_BF": bias, "HAS_BC": bias, "F_IEEE": in_type == "fp32",
                                   "C_IEEE": in_type == "fp32", "WITH_JS": js, "UPCAST": False}})
    return out


def analyse(cfg: dict) -> dict:
    info, compiled = compile_one(cfg["kernel"], cfg["dtype"], cfg["constexprs"], cfg["num_warps"], cfg["ints"])
    row = {"kernel": cfg["kernel"].fn.__name__, "dtype": cfg["dtype"], "N": cfg["N"], "V": cfg["V"], "K": cfg["K"],
           "js": cfg["js"], "d": cfg.get("d"), "num_warps": cfg["num_warps"],
           **{k: v for k, v in cfg["constexprs"].items() if k not in ("K", "WITH_JS")}, **info}
    loops = sass_loops(compiled.asm["cubin"])
    row["loops"] = loops
    if "ids_per_thread" in cfg and loops:
        # the first loop is the first pass's full tiles: each thread handles ids_per_thread ids of
        # the factual teacher and of each of the K counterfactual teachers per iteration
        row["instructions_per_logit"] = round(loops[0]["instructions"] / (cfg["ids_per_thread"] * (1 + cfg["K"])), 2)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["# Static cost of the kernels on sm_90 (compiled here, not run)", "",
             f"Made by `python benchmarks/kernel_sass.py --out benchmarks/kernel_sass.md` (triton {triton.__version__}, "
             "compiled for an H100 with a real launch's argument specialisation). Counts, not timings.", "",
             "## Logits kernel: first-pass vocabulary loop (full tiles)", "",
             "Per logit: the loop's instructions over the ids each thread handles per iteration, factual and "
             "counterfactual together (not shown for vocabularies under one tile).", "",
             "| dtype | N | V | K | JS | ROWS x LANES x VEC | warps | regs | spill B | SASS / iter | per logit "
             "| barriers | shuffles | MUFU | JS pass SASS / iter |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] != "_divergence_kernel" or not r["loops"]:
            continue
        first = r["loops"][0]
        js_loop = r["loops"][2]["instructions"] if r["js"] and len(r["loops"]) > 2 else "-"
        lines.append(f"| {r['dtype']} | {r['N']} | {r['V']} | {r['K']} | {r['js']} | {r['ROWS']} x {r['LANES']} x "
                     f"{r['VEC']} | {r['num_warps']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{first['instructions']} | {r['instructions_per_logit'] if r['V'] >= 1024 else '-'} | {first['barriers']} | "
                     f"{first['shuffles']} | {first['mufu']} | {js_loop} |")
    lines += ["", "## Fused-linear kernel", "",
              "| dtype | N | V | d | K | JS | ROWS x BLOCK_V x BLOCK_D | warps | regs | spill B | shared B | "
              "tensor cores |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kernel"] != "_fused_linear_kernel":
            continue
        lines.append(f"| {r['dtype']} | {r['N']} | {r['V']} | {r['d']} | {r['K']} | {r['js']} | {r['ROWS']} x "
                     f"{r['BLOCK_V']} x {r['BLOCK_D']} | {r['num_warps']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']} | {r['uses_mma']} |")
    return "\n".join(lines) + "\n"


_CONFIGS: list[dict] = []


def _analyse_index(i: int) -> dict:
    return analyse(_CONFIGS[i])


def analyse_all(jobs: int) -> list[dict]:
    """Every configuration in order; compiling (LLVM, ptxas) is per configuration and independent,
    so ``jobs`` forked processes share them (the kernels are built in the parent, inherited)."""
    _CONFIGS[:] = logits_configs() + fused_configs()
    if jobs <= 1:
        return [analyse(c) for c in _CONFIGS]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
        return list(pool.map(_analyse_index, range(len(_CONFIGS))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="also write a markdown table here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="configurations compiled at once, one process each (default: CPU cores, at most 2)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this script compiles for the GPU", file=sys.stderr)
        return 2
    rows = []
    for row in analyse_all(args.jobs):
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(markdown(rows))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
