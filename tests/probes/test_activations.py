"""Activation capture: the TransformerLens and nnsight backends agree with each other and with
Hugging Face's own hidden states; sites follow the teacher's system prompt."""

from __future__ import annotations

import pytest
import torch
from subliminal.probes import activations as A

from subliminal.data import Row
from subliminal.manifest import SubliminalError
from subliminal.models import load_model

ROWS = [(Row(f"r{i}", "Continue the list : 3 , 4 , 5", " , ".join(str(j) for j in range(i + 2))), {}, "x")
        for i in range(5)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_backends_agree_with_each_other_and_hf(tiny_model_factory, arch):
    path = tiny_model_factory(arch, n_layers=3)
    names = [A.hook_name(layer, c) for layer in range(3) for c in A.COMPONENTS]
    got = {}
    for backend, bs in (("transformer_lens", 2), ("nnsight", 3)):
        lm = load_model(path)  # a fresh module: the bridge wraps blocks in place
        ex = A.build_examples(lm.tokenizer, ROWS, system_prompt="You love owls .")
        got[backend] = A.capture(lm, ex, names, backend=backend, batch_size=bs, progress=False)
    for n in names:
        assert got["transformer_lens"][n].shape == (sum(len(e.positions) for e in ex), 32)
        torch.testing.assert_close(got["transformer_lens"][n], got["nnsight"][n], atol=1e-5, rtol=1e-5)
    # HF hidden_states[l + 1] is block l's output (the last one has the final norm applied: skip it)
    lm = load_model(path)
    for e_i, e in enumerate(ex):
        with torch.no_grad():
            hs = lm.model(torch.tensor([e.input_ids]), output_hidden_states=True).hidden_states
        start = sum(len(x.positions) for x in ex[:e_i])
        for layer in range(2):
            want = hs[layer + 1][0, e.positions]
            have = got["nnsight"][A.hook_name(layer)][start: start + len(e.positions)]
            torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    # attention + MLP outputs add up to the residual update of a pre-norm block
    for layer in range(1, 3):
        g = got["nnsight"]
        upd = g[A.hook_name(layer)] - g[A.hook_name(layer - 1)]
        torch.testing.assert_close(upd, g[A.hook_name(layer, "attn_out")] + g[A.hook_name(layer, "mlp_out")],
                                   atol=1e-4, rtol=1e-4)


def test_sites_follow_system_prompt_and_positions(teachers):
    _, owl, _ = teachers
    lm = load_model(owl)
    plain = A.build_examples(lm.tokenizer, ROWS[:1], system_prompt=None)[0]
    taught = A.build_examples(lm.tokenizer, ROWS[:1], system_prompt=lm.system_prompt)[0]
    assert taught.n_prompt > plain.n_prompt
    # the site of completion token k predicts it: the token after the site is the completion token
    for p, m in zip(taught.positions, taught.meta):
        assert taught.input_ids[p + 1] == m["token"]
    ans = A.build_examples(lm.tokenizer, ROWS[:2], system_prompt=None, positions="answer")
    assert [e.positions for e in ans] == [[e.n_prompt - 1] for e in ans]
    with pytest.raises(SubliminalError, match="divergence"):
        A.build_examples(lm.tokenizer, ROWS[:1], system_prompt=None, positions="divergence")


def test_resolve_layers():
    assert A.resolve_layers("all", 4) == [0, 1, 2, 3]
    assert A.resolve_layers("0-2,-1", 4) == [0, 1, 2, 3]
    assert A.resolve_layers("1,1,3", 4) == [1, 3]
    for bad in ("4", "x", "2-9"):
        with pytest.raises(SubliminalError):
            A.resolve_layers(bad, 4)


def test_auto_falls_back_to_nnsight_only_when_asked(tiny_model_factory, monkeypatch):
    lm = load_model(tiny_model_factory("llama", n_layers=3))

    def refuse(self, loaded):
        raise A.UnsupportedByBackend("TransformerLens TransformerBridge cannot handle FooForCausalLM")

    monkeypatch.setattr(A.TransformerLensBackend, "__init__", refuse)
    assert A.make_backend(lm, "auto").name == "nnsight"
    with pytest.raises(SubliminalError, match="cannot handle"):
        A.make_backend(lm, "transformer_lens")


def test_capture_to_dir_saves_and_reuses(tiny_model_factory, tmp_path):
    lm = load_model(tiny_model_factory("llama", n_layers=3))
    acts, ex = A.capture_to_dir(lm, ROWS, tmp_path / "a", layers="0,2", backend="nnsight", seed=0)
    saved, sites = A.load_activations(tmp_path / "a")
    assert set(saved) == {"blocks.0.hook_resid_post", "blocks.2.hook_resid_post"}
    assert len(sites) == saved["blocks.0.hook_resid_post"].shape[0] == sum(len(e.positions) for e in ex)
    assert (tmp_path / "a" / "manifest.json").is_file()
    mtime = (tmp_path / "a" / "activations.safetensors").stat().st_mtime_ns
    again, _ = A.capture_to_dir(lm, ROWS, tmp_path / "a", layers="0,2", backend="nnsight", seed=0)
    assert (tmp_path / "a" / "activations.safetensors").stat().st_mtime_ns == mtime
    torch.testing.assert_close(again["blocks.2.hook_resid_post"], acts["blocks.2.hook_resid_post"])
