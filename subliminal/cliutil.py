"""Arguments shared by the stage commands, so every stage spells them the same way."""

from __future__ import annotations

import argparse


def add_seed(p: argparse.ArgumentParser, default: int = 0) -> None:
    p.add_argument("--seed", type=int, default=default, help="seed for every stochastic step (default %(default)s)")


def add_model_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default %(default)s)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a checkpoint's own Python code to run (off by default)")


def add_device_map(p: argparse.ArgumentParser) -> None:
    """For the inference stages only: a teacher bigger than one GPU."""
    p.add_argument("--device-map", choices=["auto"], default=None,
                   help="auto: spread the model's layers over every visible GPU (then CPU memory) with "
                   "accelerate's big-model inference, for a model that does not fit one device; one process "
                   "only (not under a launcher with more than one rank); --device is then ignored "
                   "(default: the whole model on --device)")


def runtime_kwargs(args: argparse.Namespace) -> dict:
    kw = {"device": args.device, "dtype": args.dtype, "trust_remote_code": args.trust_remote_code}
    if getattr(args, "device_map", None):
        kw["device_map"] = args.device_map
    return kw


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --out holds (a finished output, or an unfinished run made with other inputs "
                   "or settings) instead of refusing; without it the same command on a finished output does "
                   "nothing, and a different one stops")


def device_type(device: str | None) -> str:
    """The part of ``--device`` that can change numbers (cpu, cuda, mps): a resumed run may move
    to another GPU, not to another kind of device. Raises for a device torch does not know."""
    from .models import resolve_device

    return resolve_device(device).type
