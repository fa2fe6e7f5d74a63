"""The torch reference (CPU backend, and ground truth for the kernels): hand-computed values,
agreement with naive whole-tensor float64 formulas whatever the chunking, error handling."""

from __future__ import annotations

import math

import pytest
import torch
from kernel_helpers import assert_stats_close, make_logits, naive_stats
from subliminal.kernels import divergence_stats, fused_linear_divergence_stats, resolve_backend

INF = math.inf


def test_hand_computed_two_token_vocabulary() -> None:
    f = torch.tensor([[math.log(0.25), math.log(0.75)]], dtype=torch.float64)
    c = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # uniform
    out = divergence_stats(f, c, torch.tensor([0]), backend="torch")
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    js = 0.5 * (0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.625)) \
        + 0.5 * (0.5 * math.log(0.5 / 0.375) + 0.5 * math.log(0.5 / 0.625))
    assert out["kl"].item() == pytest.approx(kl, abs=1e-15)
    assert out["js"].item() == pytest.approx(js, abs=1e-15)
    assert out["margin"].item() == pytest.approx(math.log(3.0), abs=1e-15)
    assert out["logp_factual"].item() == pytest.approx(math.log(0.25), abs=1e-15)
    assert out["logp_counterfactual"].item() == pytest.approx(math.log(0.5), abs=1e-15)
    assert out["argmax_factual"].item() == 1
    assert out["argmax_counterfactual"].item() == 0  # tie -> lowest id
    assert out["rank"].item() == 0  # token 0 ties with id 1 but no lower id ties
    assert out["kl"].dtype == torch.float64


def test_ties_rank_and_argmax() -> None:
    c = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0]])
    f = torch.tensor([[2.0, 2.0, 2.0, 2.0, 2.0]])
    ranks = [divergence_stats(f, c, torch.tensor([t]), backend="torch")["rank"].item() for t in range(5)]
    assert ranks == [3, 0, 1, 2, 4]
    out = divergence_stats(f, c, torch.tensor([0]), backend="torch")
    assert out["argmax_counterfactual"].item() == 1 and out["argmax_factual"].item() == 0
    assert out["margin"].item() == 0.0


def test_masked_vocabulary_conventions() -> None:
    f = torch.tensor([[0.0, -INF], [0.0, 0.0], [0.0, -INF]], dtype=torch.float64)
    c = torch.tensor([[0.0, 0.0], [0.0, -INF], [-INF, 0.0]], dtype=torch.float64)
    out = divergence_stats(f, c, torch.tensor([0, 1, 1]), backend="torch")
    # row 0: p = [1, 0], q = [1/2, 1/2]: KL = log 2; the 0 log 0 term contributes nothing
    assert out["kl"][0].item() == pytest.approx(math.log(2.0), abs=1e-15)
    js0 = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert out["js"][0].item() == pytest.approx(js0, abs=1e-15)
    assert out["margin"][0].item() == INF  # no finite second choice
    # row 1: factual mass where the counterfactual has none -> +inf; data token impossible under c
    assert out["kl"][1].item() == INF and out["logp_counterfactual"][1].item() == -INF
    assert out["rank"][1].item() == 1
    # row 2: disjoint supports: KL inf, JS = log 2 exactly
    assert out["kl"][2].item() == INF and out["js"][2].item() == pytest.approx(math.log(2.0), abs=1e-15)
    assert out["logp_factual"][2].item() == -INF


def test_vocabulary_of_one() -> None:
    out = divergence_stats(torch.zeros(3, 1), torch.ones(2, 3, 1), torch.zeros(3, dtype=torch.int64),
                           backend="torch")
    assert torch.equal(out["margin"], torch.full((3,), INF))
    assert torch.equal(out["kl"], torch.zeros(2, 3)) and torch.equal(out["rank"], torch.zeros(2, 3, dtype=torch.int64))


@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("ties,masked", [(False, False), (True, True)])
def test_chunked_reference_matches_naive(gen: torch.Generator, chunk_size: int | None, ties: bool,
                                         masked: bool) -> None:
    f, c, t = make_logits(gen, 11, 23, 3, ties=ties, masked=masked)
    got = divergence_stats(f.double(), c.double(), t, backend="torch", chunk_size=chunk_size)
    assert_stats_close(got, naive_stats(f, c, t), atol=1e-12, rtol=1e-12)


def test_two_dimensional_counterfactual_and_dtypes(gen: torch.Generator) -> None:
    f, c, t = make_logits(gen, 9, 17, 2)
    three = divergence_stats(f, c, t, backend="torch")
    two = divergence_stats(f, c[1], t, backend="torch", with_js=False)
    assert "js" not in two and two["kl"].shape == (9,) and three["kl"].shape == (2, 9)
    for key in two:
        want = three[key][1] if three[key].dim() == 2 else three[key]
        assert torch.equal(two[key], want), key
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = divergence_stats(f.to(dtype), c.to(dtype), t, backend="torch")
        assert out["kl"].dtype == torch.float32 and out["rank"].dtype == torch.int64


@pytest.mark.parametrize("where,what", [("nan", "contains NaN"), ("posinf", r"contains \+inf"),
                                        ("allneg", "is all -inf")])
def test_bad_rows_raise_naming_the_row(gen: torch.Generator, where: str, what: str) -> None:
    f, c, t = make_logits(gen, 8, 13, 2)
    value = {"nan": math.nan, "posinf": INF, "allneg": -INF}[where]
    bad = c.clone()
    if where == "allneg":
        bad[1, 5, :] = value
    else:
        bad[1, 5, 4] = value
    with pytest.raises(ValueError, match=rf"counterfactual\[1\] logits at row 5 {what}"):
        divergence_stats(f, bad, t, backend="torch", chunk_size=2)
    f2 = f.clone()
    f2[7, 0] = math.nan
    with pytest.raises(ValueError, match=r"counterfactual\[1\] logits at row 5"):  # lowest bad row wins
        divergence_stats(f2, bad, t, backend="torch", chunk_size=3)
    f2[5, 0] = math.nan
    with pytest.raises(ValueError, match="^factual logits at row 5 contains NaN"):  # factual first on a tie
        divergence_stats(f2, bad, t, backend="torch", chunk_size=3)


def test_input_validation() -> None:
    f, c, t = torch.zeros(4, 5), torch.zeros(2, 4, 5), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="does not match"):
        divergence_stats(f, torch.zeros(2, 4, 6), t)
    with pytest.raises(ValueError, match="token id 5 at row 2 is outside"):
        divergence_stats(f, c, torch.tensor([0, 1, 5, 0]))
    with pytest.raises(ValueError, match="int64"):
        divergence_stats(f, c, t.float())
    with pytest.raises(ValueError, match="backend"):
        divergence_stats(f, c, t, backend="cuda")
    with pytest.raises(ValueError, match="bf16, fp16, fp32 or fp64"):
        divergence_stats(f.long(), c, t)
    empty = divergence_stats(torch.zeros(0, 5), torch.zeros(2, 0, 5), torch.zeros(0, dtype=torch.int64))
    assert empty["kl"].shape == (2, 0)


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0)) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    import subliminal.kernels as kernels

    monkeypatch.setattr(kernels, "_have_triton", lambda: False)
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    with pytest.raises(ValueError, match="needs the triton package"):
        resolve_backend("triton", torch.device("cuda", 0))


@pytest.mark.parametrize("shared", [True, False])
def test_fused_linear_reference_matches_logits(gen: torch.Generator, shared: bool) -> None:
    n, d, v, k = 13, 8, 29, 3
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    hc = torch.randn(k, n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    wc = w if shared else torch.randn(k, v, d, generator=gen, dtype=torch.float64)
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    bc = torch.randn(k, v, generator=gen, dtype=torch.float64) if not shared else b
    t = torch.randint(0, v, (n,), generator=gen)
    got = fused_linear_divergence_stats(h, w, hc, wc, t, bias_f=b, bias_c=bc, backend="torch", chunk_size=4)
    lc = torch.einsum("knd,kvd->knv", hc, wc if not shared else w.expand(k, v, d)) + (bc if not shared else b)[..., None, :] \
        if not shared else hc @ w.T + b
    want = divergence_stats(h @ w.T + b, lc, t, backend="torch")
    assert_stats_close(got, want, atol=1e-12, rtol=1e-12)
    two = fused_linear_divergence_stats(h, w, hc[0], w, t, backend="torch", with_js=False)
    assert two["kl"].shape == (n,) and "js" not in two


def test_fused_linear_validation() -> None:
    h, w, t = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="weight_f"):
        fused_linear_divergence_stats(h, torch.zeros(5, 3), h, w, t)
    with pytest.raises(ValueError, match="weight_c"):
        fused_linear_divergence_stats(h, w, torch.zeros(2, 3, 4), torch.zeros(3, 5, 4), t)
    with pytest.raises(ValueError, match="bias_f"):
        fused_linear_divergence_stats(h, w, h, w, t, bias_f=torch.zeros(4))
