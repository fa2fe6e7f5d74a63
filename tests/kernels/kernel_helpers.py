"""Input builders and comparisons shared by the kernel tests.

KERNEL_TEST_DEVICE=cuda runs the Triton kernel tests on a GPU against the compiled kernels
(the default, cpu, runs them under Triton's interpreter): inputs go through `on_device`, the
float64 reference stays on the CPU.
"""

from __future__ import annotations

import math
import os

import torch

DEVICE = torch.device(os.environ.get("KERNEL_TEST_DEVICE", "cpu"))


def on_device(*xs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    return tuple(None if x is None else x.to(DEVICE) for x in xs)

FLOAT_KEYS = ("logp_factual", "logp_counterfactual", "kl", "js", "margin")
INT_KEYS = ("argmax_factual", "argmax_counterfactual", "rank")


def make_logits(gen: torch.Generator, n: int, v: int, k: int, *, scale: float = 3.0, ties: bool = False,
                masked: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """factual [N, V], counterfactual [K, N, V] (a noisy copy), tokens [N], float32.

    ties: values rounded to a 0.5 grid so exact ties are common (also among the maxima);
    masked: about a third of the vocabulary ids are -inf per row (never a whole row), and the
    two teachers mask different ids so KL is sometimes +inf.
    """
    f = torch.randn(n, v, generator=gen) * scale
    c = f.unsqueeze(0) + torch.randn(k, n, v, generator=gen)
    if ties:
        f, c = (f * 2).round() / 2, (c * 2).round() / 2
    if masked and v > 1:
        mf = torch.rand(n, v, generator=gen) < 0.33
        mc = torch.rand(k, n, v, generator=gen) < 0.33
        mf[:, 0] = False
        mc[:, :, 0] = False
        f = f.masked_fill(mf, -math.inf)
        c = c.masked_fill(mc, -math.inf)
    tokens = torch.randint(0, v, (n,), generator=gen)
    if ties and n > 0:
        # make some data tokens sit exactly on a tie with the counterfactual argmax
        idx = torch.arange(0, n, 3)
        tokens[idx] = c[0, idx].argmax(-1)
    return f, c, tokens


def naive_stats(f: torch.Tensor, c: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Straightforward float64 formulas over whole tensors, for checking the chunked reference."""
    f, c = f.double(), c.double()
    v = f.shape[-1]
    lpf, lpc = f.log_softmax(-1), c.log_softmax(-1)
    pf, pc = lpf.exp(), lpc.exp()
    kl = torch.nansum(torch.where(pf > 0, pf * (lpf - lpc), 0.0), -1)
    kl = torch.where(((f > -math.inf) & (c == -math.inf)).any(-1), math.inf, kl)
    m = (pf + pc) / 2
    lm = m.log()
    js = 0.5 * (torch.where(pf > 0, pf * (lpf - lm), 0.0) + torch.where(pc > 0, pc * (lpc - lm), 0.0)).sum(-1)
    ids = torch.arange(v)
    fs = torch.sort(f, -1, descending=True).values
    margin = fs[..., 0] - fs[..., 1] if v > 1 else torch.full(f.shape[:-1], math.inf, dtype=torch.float64)
    margin = torch.where(torch.isneginf(fs[..., 1]) if v > 1 else torch.ones_like(margin, dtype=torch.bool),
                         math.inf, margin)
    at = c.gather(-1, tokens.expand(c.shape[0], -1)[..., None])
    rank = (c > at).sum(-1) + ((c == at) & (ids < tokens[:, None])).sum(-1)

    def first_max(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[:-1], dtype=torch.int64)
        flat, fo = x.reshape(-1, v), out.reshape(-1)
        for i in range(flat.shape[0]):
            fo[i] = min(j for j in range(v) if flat[i, j] == flat[i].max())
        return out

    return {
        "argmax_factual": first_max(f), "argmax_counterfactual": first_max(c),
        "logp_factual": lpf.gather(-1, tokens[:, None])[:, 0],
        "logp_counterfactual": lpc.gather(-1, tokens.expand(c.shape[0], -1)[..., None])[..., 0],
        "kl": kl, "js": js, "margin": margin, "rank": rank,
    }


def assert_stats_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, atol: float,
                       rtol: float = 1e-5, kl_atol: float | None = None) -> None:
    """Integers exactly; floats with equal infinities and |got - want| <= atol + rtol |want|."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    got = {key: val.cpu() for key, val in got.items()}
    for key in INT_KEYS:
        assert got[key].dtype == torch.int64, key
        assert torch.equal(got[key], want[key].to(torch.int64)), (key, got[key], want[key])
    for key in FLOAT_KEYS:
        if key not in got:
            continue
        g, w = got[key].double(), want[key].double()
        assert g.shape == w.shape, (key, g.shape, w.shape)
        assert not torch.isnan(g).any(), (key, "NaN in output", g)
        assert torch.equal(torch.isinf(g), torch.isinf(w)), (key, g, w)
        fin = torch.isfinite(w)
        assert torch.equal(g[~fin], w[~fin]), (key, "infinities differ")
        tol = (kl_atol if key in ("kl", "js") and kl_atol is not None else atol) + rtol * w[fin].abs()
        err = (g[fin] - w[fin]).abs()
        assert bool((err <= tol).all()), (key, float(err.max()), "max abs error")
