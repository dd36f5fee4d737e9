"""Where a model runs and in what precision: `resolve_device` turns what a user writes ("auto", "cpu",
"cuda", "cuda:1", "mps") into a `torch.device` this machine has, and `default_dtype` is the precision that
device runs a model fastest in without hurting it.

    device = resolve_device("auto")             # cuda:0 with a GPU, else mps on a Mac, else cpu
    model = load_default_model(default_dtype(device), device=device)

A device that is named but absent is refused here, with what to use instead, before any model loads: torch's
own error comes later and deep ("Torch not compiled with CUDA enabled" from the first `.to`). The library's
loaders take `device=None` for the CPU, as before; the `vlm` commands and the demo default to "auto".

Plain torch and `vlm.checks`: the module sits with the towers, lowest in the layers.
"""

from __future__ import annotations

import torch

from vlm.checks import InvalidValue

FORMS = "auto, cpu, cuda, cuda:N or mps"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DeviceUnavailable(InvalidValue):
    """A well-formed device this machine lacks: `str(err)` is "<name> '<value>': <why>; <advice>", one line
    (`rule` keeps the "must be ..." wording of `InvalidValue` for callers that build their own message)."""

    def __init__(self, name: str, value: str, why: str, advice: str = "use cpu or auto") -> None:
        super().__init__(name, f"a device this machine has ({why})", value)
        self.args = (f"{name} {value!r}: {why}; {advice}",)


def resolve_device(spec: str | torch.device | None = "auto", name: str = "device") -> torch.device:
    """ "auto" (or None) -> the best device here: CUDA (`cuda:0`, torch's current device), else Apple's MPS,
    else the CPU. "cpu", "cuda", "cuda:N" and "mps" are checked: one this machine lacks, or a CUDA index past
    the last GPU, raises `DeviceUnavailable` (an `InvalidValue`, so a ValueError) saying why; anything else
    raises `InvalidValue` listing the accepted forms. `name` words the error (the CLI passes "--device")."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    text = str(spec).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):  # torch's words for an unparsable device string
        raise InvalidValue(name, FORMS, spec) from None
    if device.type == "cpu" and device.index in (None, 0):
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                name, text, "no CUDA device is visible here (torch.cuda.is_available() is False)"
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            gpus = f"{count} CUDA device{'s' if count != 1 else ''}"
            indices = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise DeviceUnavailable(name, text, f"this machine has {gpus}", f"use {indices}, or auto")
        return torch.device("cuda", index)
    if device.type == "mps" and device.index in (None, 0):
        if not _mps_available():
            raise DeviceUnavailable(
                name, text, "no Apple MPS device is here (torch.backends.mps.is_available() is False)"
            )
        return torch.device("mps")
    raise InvalidValue(name, FORMS, spec)  # a device torch knows (xla, meta, cpu:1, ...) but we do not run on


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bfloat16 on a CUDA GPU with native bf16 (Ampere and later: half the memory, tensor cores, and fp32's
    range, so no loss scaling), else float32. Not float16 on older GPUs: its range overflows in LM
    activations; not bf16 on CPUs or MPS, where it is emulated or partial and mostly slower."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    return torch.float32


def native_bf16(device: str | torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here: a CUDA GPU with bf16 (Ampere and later), or a CPU
    whose oneDNN has a bf16 path (AVX-512 BF16 or AMX). Elsewhere bf16 is emulated: on an AVX2-only AMD EPYC,
    torch.mm in bf16 measured 0.74 GFLOP/s against 111 in float32 (1024^3, 2 cores) — 150x slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """ "auto" (or None) -> `default_dtype(device)`; "float32", "bfloat16", "float16" (or a torch dtype) as given."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name == "auto":
        return default_dtype(device)
    if name not in DTYPES:
        raise InvalidValue("dtype", "auto, " + ", ".join(DTYPES), name)
    return DTYPES[name]


def same_device(a: str | torch.device, b: str | torch.device) -> bool:
    """Are `a` and `b` one device? "cuda" (no index) is torch's current CUDA device, as torch reads it."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)
