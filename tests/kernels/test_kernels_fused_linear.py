"""The fused-linear Triton kernel (logits never materialised) against the float64 chunked-matmul
reference. Hidden states and unembeddings are small integers (times 1/4), so every logit is
exact in fp32, bf16 and fp64 alike: argmax, rank and ties can be compared exactly."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import DEVICE, assert_stats_close, on_device
from subliminal.kernels import fused_linear_divergence_stats


def integer_inputs(gen: torch.Generator, n: int, v: int, d: int, k: int, *, shared: bool, bias: str,
                   dtype: torch.dtype, masked: bool = False):
    """(h, w, hc, wc, b, bc, tokens); bias in {"none", "shared", "per-teacher"}; masked puts -inf
    into the biases (a masked vocabulary), never on every id."""
    def ints(*shape: int) -> torch.Tensor:
        return torch.randint(-2, 3, shape, generator=gen).to(dtype)

    h, hc = ints(n, d), ints(k, n, d)
    w = ints(v, d) * 0.25
    wc = w if shared else ints(k, v, d) * 0.25
    b = bc = None
    if bias != "none":
        b = torch.randint(-4, 4, (v,), generator=gen).float() * 0.5
        bc = b if bias == "shared" else torch.randint(-4, 4, (k, v), generator=gen).float() * 0.5
        if masked and v > 1:
            b = b.masked_fill(torch.rand(v, generator=gen) < 0.3, -math.inf)
            bc = bc.masked_fill(torch.rand(bc.shape, generator=gen) < 0.3, -math.inf)
            b[0] = 0.0
            bc[..., 0] = 0.0
    tokens = torch.randint(0, v, (n,), generator=gen)
    return h, w, hc, wc, b, bc, tokens


def as64(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.double()


def poisoned(n: int, v: int, k: int) -> dict[str, torch.Tensor]:
    from subliminal.kernels._checks import Shapes
    from subliminal.kernels.divergence_triton import alloc_outputs

    out = alloc_outputs(Shapes(k=k, n=n, v=v, squeeze=False), DEVICE)
    for buf in out.values():
        buf.fill_(math.nan if buf.is_floating_point() else -7)
    return out


CASES = [  # (N, V, d, K, shared, bias, dtype, masked)
    (37, 300, 40, 3, True, "shared", torch.float32, False),
    (5, 1, 16, 1, True, "none", torch.float32, False),
    (70, 200, 24, 2, False, "per-teacher", torch.bfloat16, True),
    (9, 1000, 72, 1, True, "none", torch.float16, False),
    (3, 130, 33, 12, False, "shared", torch.bfloat16, True),
]


@pytest.mark.parametrize("n,v,d,k,shared,bias,dtype,masked", CASES)
def test_matches_float64_reference(gen: torch.Generator, n: int, v: int, d: int, k: int, shared: bool, bias: str,
                                   dtype: torch.dtype, masked: bool) -> None:
    from subliminal.kernels.fused_linear import fused_linear_stats_triton

    h, w, hc, wc, b, bc, t = integer_inputs(gen, n, v, d, k, shared=shared, bias=bias, dtype=dtype, masked=masked)
    for with_js in (True, False):
        got = fused_linear_stats_triton(*on_device(h, w, b, hc, wc, bc, t), with_js=with_js, out=poisoned(n, v, k))
        want = fused_linear_divergence_stats(h.double(), w.double(), hc.double(), wc.double(), t, bias_f=as64(b),
                                             bias_c=as64(bc), backend="torch", with_js=with_js)
        assert got["kl"].dtype == torch.float32 and got["kl"].shape == (k, n)
        assert_stats_close(got, want, atol=2e-5, rtol=2e-5, kl_atol=5e-5)


def test_gpu_default_block_sizes(gen: torch.Generator) -> None:
    """The CUDA block sizes (the interpreter picks larger ones): several vocabulary and d blocks."""
    from subliminal.kernels.fused_linear import fused_block_sizes, fused_linear_stats_triton

    n, v, d, k = 70, 200, 72, 2
    h, w, hc, wc, b, bc, t = integer_inputs(gen, n, v, d, k, shared=False, bias="shared", dtype=torch.float16,
                                            masked=True)
    rows, bv, bd, warps = fused_block_sizes(n, v, d)
    assert (rows, bv, bd) == (64, 64, 32)
    got = fused_linear_stats_triton(*on_device(h, w, b, hc, wc, bc, t), with_js=True, out=poisoned(n, v, k), rows=rows,
                                    block_v=bv, block_d=bd, num_warps=warps)
    want = fused_linear_divergence_stats(h.double(), w.double(), hc.double(), wc.double(), t, bias_f=as64(b),
                                         bias_c=as64(bc), backend="torch")
    assert_stats_close(got, want, atol=2e-5, rtol=2e-5, kl_atol=5e-5)


def test_continuous_inputs_two_dimensional(gen: torch.Generator) -> None:
    n, v, d = 21, 257, 48
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen) / d ** 0.5
    hc = h + 0.3 * torch.randn(n, d, generator=gen)
    t = torch.randint(0, v, (n,), generator=gen)
    got = {key: val.cpu() for key, val in fused_linear_divergence_stats(*on_device(h, w, hc, w, t), backend="triton").items()}
    want = fused_linear_divergence_stats(h.double(), w.double(), hc.double(), w.double(), t, backend="torch")
    assert got["rank"].shape == (n,) and got["kl"].shape == (n,)
    for key in ("logp_factual", "logp_counterfactual", "kl", "js", "margin"):
        torch.testing.assert_close(got[key].double(), want[key], atol=5e-5, rtol=1e-4)
    assert torch.equal(got["argmax_factual"], want["argmax_factual"])


def test_nan_hidden_state_raises(gen: torch.Generator) -> None:
    h, w, hc, wc, b, bc, t = integer_inputs(gen, 20, 50, 16, 2, shared=True, bias="none", dtype=torch.float32)
    hc[1, 17, 3] = math.nan
    with pytest.raises(ValueError, match=r"counterfactual\[1\] logits at row 17 contains NaN"):
        fused_linear_divergence_stats(*on_device(h, w, hc, wc, t), backend="triton")
