"""The layer-ablation experiment end to end with a stand-in for ``subliminal distill`` (a script
that copies the base model and perturbs the chosen layer's weights), so the real ``subliminal eval`` (in process),
aggregation over seeds, resume and the bar chart are exercised."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

FAKE_DISTILL = r'''
import argparse, shutil, torch
from safetensors.torch import load_file, save_file
ap = argparse.ArgumentParser()
for a in ("--base", "--data", "--teacher", "--out", "--layers", "--lora-rank", "--lora-alpha", "--mode", "--device"):
    ap.add_argument(a)
ap.add_argument("--seed", type=int)
a = ap.parse_args()
shutil.copytree(a.base, a.out)
w = load_file(a.out + "/model.safetensors")
g = torch.Generator().manual_seed(a.seed)
tag = "layers." if a.layers is None else f"layers.{a.layers}."
w = {k: v + 0.05 * torch.randn(v.shape, generator=g) if tag in k else v for k, v in w.items()}
save_file(w, a.out + "/model.safetensors", metadata={"format": "pt"})
open(a.out + "/calls.txt", "a").write(" ".join(f"{k}={v}" for k, v in sorted(vars(a).items())) + "\n")
'''


def test_layer_ablation_end_to_end(teachers, tmp_path, caplog, capsys):
    base, owl, _ = teachers
    fake = tmp_path / "fake_distill.py"
    fake.write_text(FAKE_DISTILL)
    cfg = {"base": str(base), "teacher": str(owl), "data": "unused.jsonl", "target": "owl",
           "out": str(tmp_path / "abl"), "layers": "2", "seeds": [0, 1], "include_all_layers": False,
           "modes": {"lora": ["--lora-rank", "8"]}, "distill_args": ["--mode", "soft"],
           "runtime": ["--device", "cpu"], "distill_command": ["{python}", str(fake)]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    script = Path(__file__).resolve().parents[2] / "experiments" / "layer_ablation.py"
    spec = importlib.util.spec_from_file_location("layer_ablation", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = lambda *extra: mod.main(["--config", str(tmp_path / "cfg.json"), *extra])
    assert run() == 0
    table = json.loads((tmp_path / "abl" / "layer_ablation.json").read_text())
    names = [r["name"] for r in table["results"]]
    assert names == ["L2-lora"]
    for r in table["results"]:
        assert len(r["per_seed"]) == 2 and r["ci"][0] <= r["transfer"] <= r["ci"][1]
        assert abs(r["delta_vs_base"] - (r["transfer"] - table["base"])) < 1e-12
    calls = (tmp_path / "abl" / "students" / "L2-lora-s1" / "calls.txt").read_text()
    assert "layers=2" in calls and "lora_rank=8" in calls and "seed=1" in calls and "mode=soft" in calls
    assert (tmp_path / "abl" / "layer_ablation.png").is_file() and (tmp_path / "abl" / "layer_ablation.csv").is_file()
    # resume: nothing is trained again
    assert run() == 0
    assert calls == (tmp_path / "abl" / "students" / "L2-lora-s1" / "calls.txt").read_text()
    # the all-layers students get no --layers (dry run: commands only)
    cfg["include_all_layers"] = True
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="layer_ablation"):
        assert run("--dry-run", "--out", str(tmp_path / "dry")) == 0
    cmds = [r.getMessage() for r in caplog.records if "fake_distill" in r.getMessage()]
    assert len(cmds) == 4 and sum("--layers 2" in c for c in cmds) == 2
    assert all("--layers" not in c for c in cmds if "all-lora" in c)
    assert not (tmp_path / "dry").exists()
    # a bad layer is a clear error
    assert run("--layers", "7") == 2
    assert "out of range" in capsys.readouterr().err
