"""One loader for every stage: a local HF directory, a teacher directory, or a hub model.

Only a model named as a hub model (``hf:ORG/NAME``) may touch the network, and only when the
machine is online; any other spec is a local path, and a missing one is an error at once (a
mistyped ``runs/bas`` must not wait on DNS look-ups). ``trust_remote_code`` stays off unless
asked for. Weights load through safetensors only: a directory with nothing but a pickled
``pytorch_model.bin`` is refused with the command that converts it. A loaded model whose
weights hold NaN or inf is refused, naming the file, before any stage computes with it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .manifest import SubliminalError
from .teachers import TEACHER_FILE, TeacherSpec, is_teacher_dir, read_teacher

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": None}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PREFIX = "hf:"


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
    """The torch device for ``--device``; an unknown or absent one is an error naming the flag."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SubliminalError(f"--device {device}: not a device torch knows; use cpu, cuda, cuda:N, mps or "
                              "auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SubliminalError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SubliminalError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                                  f"device(s) (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SubliminalError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise SubliminalError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda, cuda:N, "
                              "mps or auto")
    return dev


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


def is_hub_spec(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(HUB_PREFIX)


def _check_source(spec: str) -> tuple[str, bool]:
    """Return (source, is_local); raise a clear error for missing or unusable sources. Only
    ``hf:ORG/NAME`` is a hub model; everything else is a local path and never reaches the hub."""
    if is_hub_spec(spec):
        hub_id = spec[len(HUB_PREFIX):]
        if not _HUB_ID.match(hub_id):
            raise ModelLoadError(f"{spec}: a hub model is written hf:ORG/NAME (e.g. hf:Qwen/Qwen2.5-7B-Instruct)")
        if _is_offline():
            raise ModelLoadError(
                f"{spec}: a hub model, but the hub is offline (HF_HUB_OFFLINE is set); "
                "pass a local model directory instead"
            )
        return hub_id, False
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelLoadError(f"no such local model directory: {spec} (to use a hub model, write hf:ORG/NAME)")
    if not p.is_dir():
        raise ModelLoadError(f"{spec}: expected a model directory, got a file")
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{spec}: neither a teacher directory (no {TEACHER_FILE}) nor a Hugging Face model "
                             "directory (no config.json); give a directory made by `subliminal teach` or a model "
                             "directory")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                            "vocab.json")):
        raise ModelLoadError(f"{spec}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    if not any(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").is_file():
        if any(p.glob("pytorch_model*.bin")):
            raise ModelLoadError(
                f"{spec}: has only pickled pytorch_model.bin weights; subliminal loads weights through safetensors "
                "only (a pickle can run code). Convert once with: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{spec}').save_pretrained('{spec}')\"")
        raise ModelLoadError(f"{spec}: no weights (no *.safetensors file)")
    return str(p), True


def _teacher_source(spec: str, source: str) -> tuple[str, bool]:
    """``_check_source`` for a teacher's base or weights, naming the teacher when it fails."""
    try:
        return _check_source(source)
    except ModelLoadError as e:
        raise ModelLoadError(f"teacher {spec}: its model {source} (from {Path(spec) / TEACHER_FILE}) is unusable: "
                             f"{e}. Restore it, or re-make the teacher with `subliminal teach --base ...`") from None


_TOKENIZERS: dict[tuple[Any, ...], Any] = {}


def _tokenizer_key(source: str, trust_remote_code: bool) -> tuple[Any, ...]:
    """A local tokenizer's identity: its directory and every tokenizer file's size and mtime."""
    d = Path(source).resolve()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in d.iterdir()
                   if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges",
                                                          "added_tokens", "chat_template"))
                                       or f.name == "config.json"))
    return (str(d), trust_remote_code, tuple(files))


def load_tokenizer(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer of a model or teacher directory (pad token set, left padding). A local one is
    parsed once per process and handed out as a shallow copy (attributes such as ``chat_template``
    or ``padding_side`` set on one copy stay there): SmolLM2's tokenizer took 0.14 s per
    parse, every stage of every student loading it again."""
    import copy

    if is_teacher_dir(spec):
        source, local = _teacher_source(spec, read_teacher(spec).base)
    else:
        source, local = _check_source(spec)
    key = _tokenizer_key(source, trust_remote_code) if local and not trust_remote_code and Path(source).is_dir() \
        else None
    if key is not None and key in _TOKENIZERS:
        return copy.copy(_TOKENIZERS[key])
    tok = _load_tokenizer(source, local, trust_remote_code)
    if key is not None:
        _TOKENIZERS[key] = tok
        return copy.copy(tok)
    return tok


def _load_tokenizer(source: str, local: bool, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

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
    except Exception as e:  # tokenizers raises plain Exception for a damaged tokenizer.json
        if type(e).__module__.startswith(("tokenizers", "json")) or "tokenizer" in str(e).lower():
            raise ModelLoadError(f"{source}: cannot read its tokenizer files ({e}); restore or re-save them") from None
        raise
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


def check_device_map(device_map: str | None) -> None:
    """``--device-map auto`` places one model over all visible devices: one process owns them, so
    it cannot be combined with a launcher's ranks (each would claim every GPU)."""
    if device_map is None:
        return
    if device_map != "auto":
        raise ModelLoadError(f"--device-map {device_map}: only 'auto' is supported")
    from . import distributed

    if distributed.is_distributed():
        raise ModelLoadError(f"--device-map auto spreads one model over every visible device, but this job runs "
                             f"{distributed.world_size()} processes (WORLD_SIZE); run it as one process (plain "
                             "`subliminal ...`, no torchrun), or drop --device-map to give each rank its own GPU")


def _load_hf(source: str, local: bool, dtype: torch.dtype | None, trust_remote_code: bool,
             device_map: str | None = None) -> Any:
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
    kwargs["use_safetensors"] = True
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(source, config=config, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{source}: unsupported architecture for causal LM ({e})") from None
    except OSError as e:
        raise ModelLoadError(_hub_hint(source, local, e)) from None
    except Exception as e:
        if type(e).__name__ == "SafetensorError" or type(e).__module__.startswith("safetensors"):
            raise ModelLoadError(f"{_weights_file(source)}: cannot read the weights ({e}); the file is truncated "
                                 "or corrupt: re-save or re-download the model") from None
        raise


def _weights_file(source: str) -> str:
    """The weights file to name in an error: the single ``model.safetensors`` where there is one."""
    p = Path(source)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else []
    return str(files[0]) if len(files) == 1 else source


def check_finite_weights(model: Any, source: str) -> None:
    """Refuse weights that hold NaN or inf: every number a stage computes from them would be
    garbage (and a loss on them is not a learning-rate problem)."""
    for name, param in model.named_parameters():
        bad = ~torch.isfinite(param.detach())
        if bool(bad.any()):
            raise ModelLoadError(f"the model's weights contain NaN/inf: {_weights_file(source)} "
                                 f"({int(bad.sum())} non-finite values in {name}); the checkpoint is broken, "
                                 "re-create it from a good one")


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | None = "cpu",
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
    merge_adapter: bool = True,
    device_map: str | None = None,
) -> LoadedModel:
    """Load a model directory, teacher directory or ``hf:`` hub model, in eval mode on ``device``
    (under a launcher on CUDA, ``cuda`` is this rank's GPU). ``device_map="auto"`` instead lets
    accelerate place the layers over every visible device (see :func:`check_device_map`)."""
    from . import distributed

    spec = str(spec)
    check_device_map(device_map)
    dev = distributed.rank_device(resolve_device(device))
    if device_map is not None:
        dev = resolve_device("auto")
    torch_dtype = resolve_dtype(dtype, dev)
    teacher = None
    system_prompt = None
    source = spec
    if is_teacher_dir(spec):
        teacher = read_teacher(spec)
        system_prompt = teacher.system_prompt
        source = teacher.weights if (teacher.weights and teacher.weights_kind == "full") else teacher.base
    src, local = _teacher_source(spec, source) if teacher is not None else _check_source(source)
    model = _load_hf(src, local, torch_dtype, trust_remote_code, device_map)
    if teacher is not None and teacher.weights and teacher.weights_kind == "lora":
        from peft import PeftModel

        if not Path(teacher.weights).is_dir():
            raise ModelLoadError(f"{spec}: adapter directory {teacher.weights} is missing")
        model = PeftModel.from_pretrained(model, teacher.weights)
        if merge_adapter:
            model = model.merge_and_unload()
    check_finite_weights(model, teacher.weights if teacher is not None and teacher.weights else src)
    tokenizer = load_tokenizer(src, trust_remote_code=trust_remote_code)
    if device_map is None:  # accelerate placed a device-mapped model already (hooks move the inputs)
        model.to(dev)
    model.eval()
    if teacher is not None and teacher.method == "steer":
        # the one place a steer teacher's vector enters: every stage that loads it runs steered
        from .steer import attach_teacher

        attach_teacher(model, teacher.extra["steer"], spec)
    return LoadedModel(model=model, tokenizer=tokenizer, source=spec, system_prompt=system_prompt, teacher=teacher)


def same_tokenizer(a: Any, b: Any) -> bool:
    """Teachers must share a vocabulary for their predictions to be compared token by token."""
    if len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab()


# ------------------------------------------------------------------------------------- layers


def layer_count(config: Any) -> int:
    """The number of transformer blocks of a model, from its HF config (an object or the dict of
    ``config.json``): the one count every stage, the driver and the plan use."""
    if not isinstance(config, dict):
        config = (config.get_text_config() if hasattr(config, "get_text_config") else config).to_dict()
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    text = config.get("text_config")
    if isinstance(text, dict):
        return layer_count(text)
    raise SubliminalError("cannot tell the number of layers from the model's config (no num_hidden_layers, "
                          "n_layer or num_layers)")


def layer_count_of_dir(path: str | os.PathLike) -> int:
    """:func:`layer_count` of a local model directory (its ``config.json``), without loading it."""
    cfg = Path(path) / "config.json"
    try:
        return layer_count(json.loads(cfg.read_text()))
    except SubliminalError as e:
        raise SubliminalError(f"{cfg}: {e}") from None


def parse_layers(spec: str | Sequence[int] | None, flag: str = "--layers") -> list[int] | None:
    """The one ``--layers`` grammar: ``all``/None (every layer: None), or indices and ranges,
    ``0,2,5``, ``0-3``, ``-1`` (negative counts from the end), in the order given, repeats dropped.
    Only the syntax: :func:`resolve_layers` checks them against a model."""
    if spec is None or spec == "all":
        return None
    items: list[int] = []
    if isinstance(spec, str):
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            m = re.fullmatch(r"(\d+)-(\d+)", part)
            if m:
                items.extend(range(int(m.group(1)), int(m.group(2)) + 1))
            elif re.fullmatch(r"-?\d+", part):
                items.append(int(part))
            else:
                raise SubliminalError(f"{flag} {spec!r}: expected 'all', '0,2,5', '0-3' or '-1'")
        if not items:
            raise SubliminalError(f"{flag} {spec!r}: no layer given")
    else:
        items = [int(x) for x in spec]
    return list(dict.fromkeys(items))


def resolve_layers(spec: str | Sequence[int] | None, n_layers: int, flag: str = "--layers") -> list[int]:
    """:func:`parse_layers` against a model of ``n_layers`` blocks: every layer for ``all``/None,
    negative indices counted from the end; an index out of range is an error naming the range."""
    items = parse_layers(spec, flag)
    if items is None:
        return list(range(n_layers))
    out = []
    for x in items:
        y = x + n_layers if x < 0 else x
        if not 0 <= y < n_layers:
            raise SubliminalError(f"{flag}: layer {x} out of range: the model has {n_layers} layers "
                                  f"(0..{n_layers - 1})")
        if y not in out:
            out.append(y)
    return out

