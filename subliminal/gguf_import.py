"""``subliminal import-gguf``: turn a GGUF file into an ordinary Hugging Face model directory.

Why: small instruct checkpoints often ship only as GGUF (llama.cpp's format), and every stage
here loads plain HF directories. transformers reads a GGUF file (``from_pretrained(dir,
gguf_file=name)``, through the ``gguf`` package) and dequantises it, but the model it returns
carries a GGUF ``quantization_config`` and refuses ``save_pretrained``. So the model is rebuilt
from its config without that entry, the dequantised state dict is loaded into it, and the result
is saved as safetensors with the tokenizer and chat template beside it, plus a manifest holding
the source file's SHA-256, so every stage treats it like any local checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from .manifest import SubliminalError, write_manifest

log = logging.getLogger(__name__)
STAGE = "import-gguf"


class GGUFImportError(SubliminalError):
    pass


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GGUFImportError("reading GGUF files needs the 'gguf' package: pip install 'subliminal-lens[gguf]' "
                              "(or pip install gguf)") from None


def rebuild_plain(model: Any) -> Any:
    """A copy of ``model`` that ``save_pretrained`` accepts: the same architecture built from its
    config without ``quantization_config``, holding the same (already dequantised) weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict({k: v for k, v in model.config.to_dict().items()
                                           if k != "quantization_config"})
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = model.state_dict()
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = set(getattr(plain, "_tied_weights_keys", None) or [])  # a list or, in transformers 5, a dict
    bad = [k for k in missing if k not in tied]
    if bad or unexpected:
        raise GGUFImportError(f"rebuilt model does not match the GGUF weights (missing {bad[:5]}, "
                              f"unexpected {list(unexpected)[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    meta = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if meta:
        raise GGUFImportError(f"rebuilt model left weights unset: {meta[:5]}")
    plain.eval()
    return plain


def import_gguf(gguf_path: str | Path, out: str | Path, *, dtype: str = "float32", overwrite: bool = False
                ) -> dict[str, Any]:
    """Read ``gguf_path`` with transformers and write ``out`` as a plain HF directory (safetensors,
    tokenizer, chat template, manifest.json). Returns a summary for the manifest and the CLI."""
    from .models import resolve_dtype

    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise GGUFImportError(f"{src}: no such GGUF file")
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFImportError(f"{src}: not a GGUF file (no GGUF magic bytes)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise GGUFImportError(f"--out {out}: exists and is not empty; pass --overwrite or choose another directory")
        shutil.rmtree(out)
    _require_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    digest = sha256_file(src)
    torch_dtype = resolve_dtype(dtype)
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, local_files_only=True,
                                                     **({"dtype": torch_dtype} if torch_dtype else {}))
    except (ValueError, OSError, KeyError, NotImplementedError) as e:
        raise GGUFImportError(f"{src}: transformers cannot read this GGUF file ({type(e).__name__}: {e})") from None
    plain = rebuild_plain(model)
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    n_params = sum(p.numel() for p in plain.parameters())
    summary = {"source_file": str(src), "source_sha256": digest, "source_bytes": src.stat().st_size,
               "architecture": type(plain).__name__, "parameters": n_params,
               "dtype": str(next(plain.parameters()).dtype).replace("torch.", ""), "vocab_size": len(tok),
               "chat_template": bool(getattr(tok, "chat_template", None))}
    write_manifest(tmp, stage=STAGE, config={"gguf": str(src), "out": str(out), "dtype": dtype}, seed=0,
                   inputs={"gguf": str(src)}, wall_time_s=time.time() - t0, extra={"import": summary})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return summary


# -------------------------------------------------------------------------------------- CLI


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-gguf", help="turn a GGUF checkpoint into a plain HF model directory",
                       description="Dequantise FILE (any GGUF that transformers reads; needs the gguf package) and "
                       "write DIR: safetensors weights, tokenizer with its chat template, and a manifest with the "
                       "source file's SHA-256. Every stage can then load DIR as a local model.")
    p.add_argument("file", help="the .gguf file")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved weights (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    s = import_gguf(args.file, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"{args.file} -> {args.out}: {s['architecture']}, {s['parameters'] / 1e6:.1f}M parameters ({s['dtype']}), "
          f"vocabulary {s['vocab_size']}, chat template {'yes' if s['chat_template'] else 'no'}; "
          f"sha256 {s['source_sha256'][:16]}...")
    return 0
