"""Compile (not run) the Triton kernels for an H100 (sm_90) on a machine without a GPU.

The CPU tests run the kernels through Triton's interpreter, which accepts programs the real
compiler rejects (types, layouts, loop-carried values). This script lowers each kernel, at the
launch configurations the wrappers choose for CUDA, through Triton's full pipeline down to a
cubin (Triton bundles ptxas), and prints the ptxas register and spill counts. It must run
without TRITON_INTERPRET (the kernel modules are then compiled-mode JITFunctions).
Usage: python tests/kernels/sm90_compile.py  (exit 0 iff every configuration compiles)
"""

from __future__ import annotations

import json
import os
import sys

import triton
from subliminal.kernels import divergence_triton as dt
from subliminal.kernels import fused_linear as fl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
OUT_TYPES = {"am_f_ptr": "*i64", "am_c_ptr": "*i64", "rank_ptr": "*i64", "tok_ptr": "*i64",
             "status_f_ptr": "*i32", "status_c_ptr": "*i32", "bf_ptr": "*fp32", "bc_ptr": "*fp32"}


def signature(kernel, in_type: str, constexprs: dict) -> dict:
    """Kernel signature: input pointers `in_type`, outputs by name, other runtime ints i32."""
    sig = {}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = OUT_TYPES.get(name, "*fp32" if name not in ("f_ptr", "c_ptr", "hf_ptr", "wf_ptr", "hc_ptr",
                                                                     "wc_ptr") else f"*{in_type}")
        else:
            sig[name] = "i32"
    missing = {n for n, p in zip(kernel.arg_names, kernel.params) if p.is_constexpr} - set(constexprs)
    assert not missing, f"constexprs not given: {missing}"
    return sig


def compile_one(kernel, in_type: str, constexprs: dict, num_warps: int) -> dict:
    src = ASTSource(fn=kernel, signature=signature(kernel, in_type, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    assert "cubin" in compiled.asm, "no cubin produced"
    return {"kernel": kernel.fn.__name__, "dtype": in_type, **{k: v for k, v in constexprs.items()},
            "num_warps": num_warps, "shared_bytes": compiled.metadata.shared,
            "uses_mma": "mma" in compiled.asm["ptx"]}


def logits_configs() -> list[tuple[str, dict, int]]:
    out = []
    for in_type, n, v, k, js in (("bf16", 16384, 151936, 1, False), ("bf16", 16384, 151936, 1, True),
                                 ("bf16", 8192, 151936, 12, False), ("fp16", 37, 7, 3, True), ("fp32", 1, 1, 1, True)):
        cfg = dt.launch_config(n, v, k)
        out.append((in_type, {"K": k, "K_PAD": cfg.k_pad, "ROWS": cfg.rows, "BLOCK_V": cfg.block_v, "WITH_JS": js,
                              "NUM_STAGES": cfg.num_stages}, cfg.num_warps))
    return out


def fused_configs() -> list[tuple[str, dict, int]]:
    out = []
    for in_type, n, v, d, k, js, bias in (("bf16", 16384, 151936, 3584, 1, False, False),
                                          ("bf16", 4096, 151936, 3584, 3, True, True),
                                          ("fp32", 5, 37, 24, 2, True, True)):
        rows, bv, bd, warps = fl.fused_block_sizes(n, v, d)
        out.append((in_type, {"K_PAD": triton.next_power_of_2(k), "ROWS": rows, "BLOCK_V": bv, "BLOCK_D": bd,
                              "HAS_BF": bias, "HAS_BC": bias, "F_IEEE": in_type == "fp32",
                              "C_IEEE": in_type == "fp32", "WITH_JS": js, "UPCAST": False}, warps))
    return out


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: this script compiles for the GPU", file=sys.stderr)
        return 2
    for kernel, configs in ((dt._divergence_kernel, logits_configs()), (fl._fused_linear_kernel, fused_configs())):
        for in_type, constexprs, warps in configs:
            print(json.dumps(compile_one(kernel, in_type, constexprs, warps)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
