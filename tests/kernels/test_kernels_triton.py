"""The streaming Triton kernel (run by Triton's CPU interpreter) against the float64 torch
reference: odd shapes, every input dtype, masked vocabularies, exact ties, K = 1 / 3 / 12,
2-D and 3-D counterfactuals, poisoned output buffers, bad rows."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import DEVICE, INT_KEYS, assert_stats_close, make_logits, on_device
from subliminal.kernels import divergence_stats

# (N, V, K, dtype, ties, masked, with_js modes): huge vocabularies only with tiny N and one mode
# each to keep the interpreter fast (with_js=False uses the one-pass KL identity, True sums KL
# directly in the second pass, so both paths meet a large vocabulary).
BOTH, JS, NO_JS = (True, False), (True,), (False,)
CASES = [
    (1, 1, 1, torch.float32, False, False, BOTH),
    (37, 7, 3, torch.float32, True, True, BOTH),
    (1000, 7, 1, torch.float32, False, True, BOTH),
    (37, 7, 3, torch.float16, True, False, BOTH),
    (2, 50257, 3, torch.bfloat16, False, True, JS),
    (1, 151936, 1, torch.float16, True, False, NO_JS),
    (1, 151936, 1, torch.bfloat16, False, True, JS),
    (37, 300, 12, torch.bfloat16, True, True, NO_JS),
    (5, 1000, 2, torch.float64, False, True, BOTH),
]


def poisoned_outputs(n: int, v: int, k: int) -> dict[str, torch.Tensor]:
    """Output buffers filled with NaN / a sentinel, so any element the kernel fails to write fails."""
    from subliminal.kernels._checks import Shapes
    from subliminal.kernels.divergence_triton import alloc_outputs

    out = alloc_outputs(Shapes(k=k, n=n, v=v, squeeze=False), DEVICE)
    for buf in out.values():
        buf.fill_(math.nan if buf.is_floating_point() else -7)
    return out


def run_triton(f: torch.Tensor, c: torch.Tensor, t: torch.Tensor, with_js: bool) -> dict[str, torch.Tensor]:
    from subliminal.kernels.divergence_triton import divergence_stats_triton

    k = c.shape[0] if c.dim() == 3 else 1
    f, c, t = on_device(f, c, t)
    return divergence_stats_triton(f, c, t, with_js=with_js, out=poisoned_outputs(f.shape[0], f.shape[1], k))


def reference(f: torch.Tensor, c: torch.Tensor, t: torch.Tensor, with_js: bool) -> dict[str, torch.Tensor]:
    return divergence_stats(f.double(), c.double(), t, backend="torch", with_js=with_js)


@pytest.mark.parametrize("n,v,k,dtype,ties,masked,modes", CASES,
                         ids=[f"N{c[0]}-V{c[1]}-K{c[2]}-{str(c[3])[6:]}{'-ties' if c[4] else ''}"
                              f"{'-masked' if c[5] else ''}" for c in CASES])
def test_matches_float64_reference(gen: torch.Generator, n: int, v: int, k: int, dtype: torch.dtype,
                                   ties: bool, masked: bool, modes: tuple[bool, ...]) -> None:
    f, c, t = make_logits(gen, n, v, k, ties=ties, masked=masked)
    f, c = f.to(dtype), c.to(dtype)  # the reference sees exactly the same (rounded) logits
    for with_js in modes:
        got = run_triton(f, c, t, with_js)
        assert got["kl"].dtype == torch.float32 and got["logp_factual"].dtype == torch.float32
        assert got["kl"].shape == (k, n) and got["margin"].shape == (n,)
        assert_stats_close(got, reference(f, c, t, with_js), atol=2e-5, rtol=2e-5, kl_atol=5e-5)


def test_gpu_default_launch_config(gen: torch.Generator) -> None:
    """The CUDA defaults (the interpreter picks larger blocks): several vocabulary blocks per row,
    one row per program, and a packed multi-row layout."""
    from subliminal.kernels.divergence_triton import divergence_stats_triton, launch_config

    for n, v, k in ((3, 5000, 2), (9, 300, 2)):
        cfg = launch_config(n, v, k)
        f, c, t = make_logits(gen, n, v, k, ties=True, masked=True)
        got = divergence_stats_triton(*on_device(f, c, t), with_js=True, out=poisoned_outputs(n, v, k), block_v=cfg.block_v,
                                      num_warps=cfg.num_warps, rows=cfg.rows, num_stages=cfg.num_stages)
        assert_stats_close(got, reference(f, c, t, True), atol=2e-5, rtol=2e-5, kl_atol=5e-5)
    assert launch_config(3, 5000, 2).rows == 1 and launch_config(9, 300, 2).rows > 1


def test_many_support_violations_and_large_rank(gen: torch.Generator) -> None:
    """Rank and support violations share one packed integer sum per block: a block full of both
    must still give the exact rank and KL = +inf."""
    from subliminal.kernels.divergence_triton import divergence_stats_triton

    n, v = 2, 5000
    f = torch.randn(n, v, generator=gen)
    c = torch.randn(1, n, v, generator=gen) + 5.0
    c[0, 0, :4000] = -math.inf  # row 0: factual mass on 4000 counterfactual-impossible ids
    t = torch.tensor([4999, 1])
    t[0] = int(c[0, 0, 4000:].argmin()) + 4000  # lowest finite counterfactual logit: large rank
    for bv in (16384, 2048):
        got = divergence_stats_triton(*on_device(f, c, t), with_js=False, out=poisoned_outputs(n, v, 1), block_v=bv)
        want = reference(f, c, t, False)
        assert got["kl"][0, 0].item() == math.inf and math.isfinite(got["kl"][0, 1].item())
        assert got["rank"][0, 0].item() == 999
        assert_stats_close(got, want, atol=2e-5, rtol=2e-5, kl_atol=5e-5)


def test_two_dimensional_counterfactual_and_k_consistency(gen: torch.Generator) -> None:
    f, c, t = make_logits(gen, 13, 257, 3, ties=True, masked=True)
    three = run_triton(f, c, t, with_js=True)
    for j in range(3):
        two = run_triton(f, c[j], t, with_js=True)
        assert two["kl"].shape == (13,)
        for key in two:
            want = three[key][j] if three[key].dim() == 2 else three[key]
            if key in INT_KEYS:
                assert torch.equal(two[key], want), key
            else:
                torch.testing.assert_close(two[key], want, atol=1e-5, rtol=1e-5, equal_nan=False)


def test_public_entry_point_dispatches_to_triton(gen: torch.Generator) -> None:
    f, c, t = make_logits(gen, 4, 33, 2)
    got = divergence_stats(*on_device(f, c[0], t), backend="triton", with_js=False)
    assert set(got) == {"argmax_factual", "argmax_counterfactual", "logp_factual", "logp_counterfactual",
                        "kl", "margin", "rank"}
    assert_stats_close(got, reference(f, c[0], t, False), atol=2e-5, kl_atol=5e-5)


@pytest.mark.parametrize("where,msg", [("nan", r"counterfactual\[2\] logits at row 3 contains NaN"),
                                       ("posinf", r"^factual logits at row 3 contains \+inf"),
                                       ("allneg", r"^factual logits at row 3 is all -inf")])
def test_bad_rows_raise(gen: torch.Generator, where: str, msg: str) -> None:
    f, c, t = make_logits(gen, 6, 40, 3)
    if where == "nan":
        c[2, 3, 17] = math.nan
        c[0, 5, 1] = math.nan  # a later row: the first bad row is the one named
    elif where == "posinf":
        f[3, 39] = math.inf
    else:
        f[3] = -math.inf
    for with_js in (True, False):
        with pytest.raises(ValueError, match=msg):
            run_triton(f, c, t, with_js)


def test_compiled_kernel_refuses_cpu_tensors() -> None:
    from subliminal.kernels.divergence_triton import check_runnable

    with pytest.raises(ValueError, match="CUDA"):
        check_runnable(object(), torch.device("cpu"))


@pytest.mark.parametrize("vec", [1, 2, 4, 8])
@pytest.mark.parametrize("block_v", [16, 64])
def test_lane_layouts_with_repeated_maxima(gen: torch.Generator, vec: int, block_v: int) -> None:
    """Every lane width and several tiles per row, on logits from a 3-value grid: the maximum
    repeats across lanes, tiles and inside one lane, so the lowest-id argmax, the runner-up
    (= the max: margin 0), the rank ties below the data token and masked ids all meet the
    per-lane bookkeeping."""
    from subliminal.kernels.divergence_triton import divergence_stats_triton

    n, v, k = 9, 300, 2
    f = torch.randint(0, 3, (n, v), generator=gen).float() * 0.5
    c = torch.randint(0, 3, (k, n, v), generator=gen).float() * 0.5
    f[0, :] = 0.0
    f[0, 250] = 1.0  # a single maximum far from the first tile: margin 1
    c[:, 1] = torch.where(torch.rand(k, v, generator=gen) < 0.3, -math.inf, c[:, 1])
    f[1] = torch.where(c[0, 1] == -math.inf, -math.inf, f[1])  # masked alike: finite KL for teacher 0
    t = torch.randint(0, v, (n,), generator=gen)
    t[2] = int(c[0, 2].argmax())  # the data token on the first maximum: rank 0
    t[3] = v - 1
    for with_js in (False, True):
        got = divergence_stats_triton(*on_device(f, c, t), with_js=with_js, out=poisoned_outputs(n, v, k), block_v=block_v,
                                      vec=vec, rows=4)
        assert_stats_close(got, reference(f, c, t, with_js), atol=2e-5, rtol=2e-5, kl_atol=5e-5)
    assert got["margin"][0].item() == 1.0 and got["rank"][0, 2].item() == 0
