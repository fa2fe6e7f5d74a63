"""Activation patching: a model patched into itself restores 100%; attribution agrees at the top."""

from __future__ import annotations

import pytest
import torch
from subliminal.probes import patching as P

from subliminal.data import Row, encode, render_chat
from subliminal.manifest import SubliminalError
from subliminal.models import load_model


@pytest.fixture(scope="module")
def pair(teachers):
    """Owl (factual) and dolphin (counterfactual) prompt teachers over the same random weights;
    completions are the owl teacher's greedy continuations, so the paper's rule finds sites."""
    _, owl, dolphin = teachers
    f, c = load_model(owl), load_model(dolphin)
    runs = []
    for i, prompt in enumerate(["Continue the list : 3 , 4 , 5", "Here are numbers : 101 , 202 , 303 ."]):
        ids = encode(f.tokenizer, render_chat(f.tokenizer, prompt, f.system_prompt))
        out = f.model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
        comp = f.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
        runs.append(P.prepare_row(f, c, Row(f"r{i}", prompt, comp)))
    sites = [(r, s) for r in runs for s in P.divergence_sites(r)]
    assert sites, "the two teachers never disagree on greedy tokens"
    return f, c, sites


def test_every_layer_into_itself_restores_all(pair):
    f, c, sites = pair
    layers = [0, 1, 2]
    for run, site in sites[:4]:
        assert site.m_f > site.m_c
        P.patch_site(f, c, run, site, layers, span="all")
        for layer in layers:  # the whole residual stream of one model into the other's run
            assert site.restore[layer] == pytest.approx(1.0, abs=1e-3)
            assert site.destroy[layer] == pytest.approx(1.0, abs=1e-3)
        P.patch_site(f, c, run, site, layers, span="position")
        assert site.restore[2] == pytest.approx(1.0, abs=1e-4)  # last block at the site decides the logits
        assert site.destroy[2] == pytest.approx(1.0, abs=1e-4)


def test_patching_a_run_with_its_own_activations_changes_nothing(pair):
    f, _, sites = pair
    run, site = sites[0]
    m = P._patched_metric(f.model, run.ids_f, site.pos_f, run.acts_f, site.pos_f, [0, 1, 2], site.token,
                          site.other, "position")
    assert m == pytest.approx([site.m_f] * 3, abs=1e-5)


def test_attribution_matches_patching_where_it_is_exact(pair):
    f, c, sites = pair
    run, site = sites[0]
    P.patch_site(f, c, run, site, [0, 1, 2], span="position")
    assert P.attribute_site(f, c, run, site, [0, 1, 2], steps=32) is True  # equal-length prompts interpolate
    # integrated gradients on the embedding path is complete: all positions at layer 0 ~ 100%
    P.attribute_site(f, c, run, site, [0], steps=32, span="all")
    assert site.attribution[0] == pytest.approx(1.0, abs=0.1)


def test_span_all_needs_equal_lengths(pair, tiny_model_factory, tmp_path):
    from subliminal.teachers import TeacherSpec, save_teacher

    f, _, sites = pair
    save_teacher(tmp_path / "t", TeacherSpec(base=f.teacher.base, method="prompt", bias="x", category="animal",
                                             system_prompt="You love cats and dogs and owls ."))
    longer = load_model(tmp_path / "t")
    run = P.prepare_row(f, longer, Row("r", "Continue the list : 3 , 4 , 5", "1 , 2 , 3"))
    site = P.Site("r", 1, run.ids_f[run.n_prompt_f + 1], 5, run.n_prompt_f, run.n_prompt_c, 1.0, 0.0)
    with pytest.raises(SubliminalError, match="same length"):
        P.patch_site(f, longer, run, site, [0], span="all")
    assert P.attribute_site(f, longer, run, site, [0], steps=4) is False  # falls back to the plain gradient


def test_summary_has_intervals_and_agreement(pair):
    f, c, sites = pair
    for run, site in sites:
        P.patch_site(f, c, run, site, [0, 1, 2])
        P.attribute_site(f, c, run, site, [0, 1, 2], steps=4)
    s = P.summarise([x for _, x in sites], [0, 1, 2], n_boot=50)
    assert s["n_sites"] == len(sites) and len(s["layers"]) == 3
    top = s["layers"][2]
    assert top["restore"] == pytest.approx(1.0, abs=1e-4)
    assert top["restore_ci"][0] <= top["restore"] <= top["restore_ci"][1] + 1e-9
    assert "pearson_site_layer" in s["agreement"]
