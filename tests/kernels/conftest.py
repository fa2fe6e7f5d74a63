"""Kernel tests run on the CPU through Triton's interpreter.

`triton.jit` picks interpreted vs compiled mode when a kernel module is imported, so
TRITON_INTERPRET=1 is set here, before any test imports subliminal.kernels' Triton modules. It
is set with monkeypatch per test (not for the whole session) so other test folders are
unaffected; the kernel modules, once imported here, stay interpreted.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch
from kernel_helpers import DEVICE


@pytest.fixture(autouse=True)
def triton_interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    if DEVICE.type == "cuda":  # KERNEL_TEST_DEVICE=cuda: the compiled kernels (kernel_helpers)
        if not torch.cuda.is_available():
            pytest.skip("KERNEL_TEST_DEVICE=cuda but no CUDA device")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        return
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # The interpreter evaluates both branches of tl.where with numpy; -inf - -inf there is expected.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: with several intra-op threads on a shared 2-core machine each
    torch op waited ~100 ms for its threads (measured: 1.3 s vs 1.7 ms per reference call)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random inputs each run; the seed is printed (shown by pytest on failure).
    Reproduce with KERNEL_TEST_SEED=<seed>."""
    seed = int(os.environ.get("KERNEL_TEST_SEED", time.time_ns() % 2**31))
    print(f"KERNEL_TEST_SEED={seed}")
    g = torch.Generator().manual_seed(seed)
    return g
