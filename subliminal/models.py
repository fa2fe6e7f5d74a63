"""One loader for every stage: a local HF directory, a teacher directory, or a hub id.

Hub ids are fetched only when the user names one and the machine is online; offline, the
error says to pass a local directory. ``trust_remote_code`` stays off unless asked for, and
weights load through safetensors (``use_safetensors`` where the checkpoint has them).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .manifest import SubliminalError
from .teachers import TeacherSpec, is_teacher_dir, read_teacher

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": None}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(SubliminalError):
    pass


@dataclass
class LoadedModel:
    """A model ready to run: its system prompt (for prompt teachers) travels with it."""

    model: Any
    tokenizer: Any
    source: str
    system_prompt: str | None = None
    teacher: TeacherSpec | None = None

    @property
    def name(self) -> str:
        if self.teacher is not None and self.teacher.bias:
            return self.teacher.bias
        return Path(self.source).name


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SubliminalError(f"--device {device}: CUDA is not available on this machine")
    return torch.device(device)


def auto_dtype(device: torch.device | str | None) -> torch.dtype:
    """``--dtype auto``: bfloat16 on a CUDA device that supports it (what the papers ran), float32
    elsewhere (CPU bf16 matmuls are slow and lose the precision CPU runs are compared at)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str | None = None) -> torch.dtype | None:
    """A torch dtype from a flag value; ``auto`` picks by ``device`` (see :func:`auto_dtype`)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SubliminalError(f"--dtype {dtype}: one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return auto_dtype(device)
    return DTYPES[dtype]


def _is_offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0", "false", "False") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _check_source(spec: str) -> tuple[str, bool]:
    """Return (source, is_local); raise a clear error for missing or unusable sources."""
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{spec}: expected a model directory, got a file")
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{spec}: no config.json: not a Hugging Face model directory")
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                                "vocab.json")):
            raise ModelLoadError(f"{spec}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
        return str(p), True
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        if _is_offline():
            raise ModelLoadError(
                f"{spec}: looks like a hub id, but the hub is offline (HF_HUB_OFFLINE is set); "
                "pass a local model directory instead"
            )
        return spec, False
    raise ModelLoadError(f"{spec}: no such model directory")


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if is_teacher_dir(spec):
        spec = read_teacher(spec).base
    source, local = _check_source(spec)
    try:
        if local and _generic_fast_tokenizer(Path(source)):
            # transformers 5 maps a generic tokenizer.json to the model type's own tokenizer class
            # (a Qwen2 config gives Qwen2Tokenizer, which re-splits a word-level vocabulary), so a
            # checkpoint that saved a plain fast tokenizer is loaded as exactly that.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(source, local_files_only=True)
        else:
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
    except OSError as e:
        raise ModelLoadError(_hub_hint(source, local, e)) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _generic_fast_tokenizer(path: Path) -> bool:
    cfg = path / "tokenizer_config.json"
    if not (path / "tokenizer.json").is_file() or not cfg.is_file():
        return False
    try:
        cls = json.loads(cfg.read_text()).get("tokenizer_class")
    except json.JSONDecodeError:
        return False
    return cls in ("PreTrainedTokenizerFast", "TokenizersBackend")


def _hub_hint(source: str, local: bool, e: Exception) -> str:
    if local:
        return f"{source}: could not load ({e})"
    return f"{source}: could not be fetched from the hub ({type(e).__name__}); offline? pass a local model directory"


def _load_hf(source: str, local: bool, dtype: torch.dtype | None, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=local)
    except ValueError as e:
        raise ModelLoadError(f"{source}: unsupported or unknown architecture ({e})") from None
    except OSError as e:
        raise ModelLoadError(_hub_hint(source, local, e)) from None
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if local and any(Path(source).glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    try:
        return AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{source}: unsupported architecture for causal LM ({e})") from None
    except OSError as e:
        raise ModelLoadError(_hub_hint(source, local, e)) from None


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
) -> LoadedModel:
    """Load a model directory, teacher directory or hub id, in eval mode on ``device``."""
    spec = str(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    teacher = None
    system_prompt = None
    source = spec
    if is_teacher_dir(spec):
        teacher = read_teacher(spec)
        system_prompt = teacher.system_prompt
        source = teacher.weights if (teacher.weights and teacher.weights_kind == "full") else teacher.base
    src, local = _check_source(source)
    model = _load_hf(src, local, torch_dtype, trust_remote_code)
    if teacher is not None and teacher.weights and teacher.weights_kind == "lora":
        from peft import PeftModel

        if not Path(teacher.weights).is_dir():
            raise ModelLoadError(f"{spec}: adapter directory {teacher.weights} is missing")
        model = PeftModel.from_pretrained(model, teacher.weights)
        if merge_adapter:
            model = model.merge_and_unload()
    tokenizer = load_tokenizer(src, trust_remote_code=trust_remote_code)
    model.to(dev)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, system_prompt=system_prompt, teacher=teacher)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Teachers must share a vocabulary for their predictions to be compared token by token."""
    if len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab()
