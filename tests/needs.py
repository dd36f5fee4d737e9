"""What a test needs from the machine it runs on, said one way everywhere.

- A package or data set that is not installed: a skip on a developer machine, a failure under `CI` (the
  project's set-up installs everything there, so a skip would hide a broken set-up).
- The CPU: tests that compare a training run with a CPU computation, or two runs with each other to 1e-6,
  pin the training scripts to the CPU (also where CUDA exists: a user with a GPU runs `make test` too).
GPU-only checks carry `@pytest.mark.gpu` (conftest.py skips them where no CUDA device is visible).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(what: str) -> NoReturn:
    """`what` (a package, a data set) is not installed: fail under `CI`, skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test, but {what}", pytrace=False)
    pytest.skip(what)


def pin_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training in this process and in the subprocesses a test starts (they inherit the environment) runs on
    the CPU: accelerate honours `ACCELERATE_USE_CPU`. accelerate's process-wide state is reset too, so each
    in-process run gets the mixed precision its config asks for (accelerate refuses a change otherwise)."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    AcceleratorState._reset_state(reset_partial_state=True)


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment for a training subprocess pinned to the CPU (CUDA hidden as well)."""
    return {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", **extra}
