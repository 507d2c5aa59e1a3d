"""FlagEmbedding 1.4's constructor arguments, and the one place that turns the public
constructors' keyword arguments into ``EngineOptions``.

``M3Model`` takes every ``BGEM3FlagModel`` argument and ``M3Reranker`` every
``FlagReranker`` one. The ones about where and how the model runs (``use_fp16``,
``use_bf16``, ``devices``) become ONNX Runtime choices here: the variant, the providers
and the device id. Values a package cannot honour are refused with why and what to pass
(docs/runtime.md has the table).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .contract import CPU, CUDA, Variant
from .engine import EngineOptions
from .errors import InputError
from .session import GPU_PROVIDERS, available_providers

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """A ``RuntimeWarning``, once per process and message."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _device(device: object) -> tuple[str, int]:
    """One FlagEmbedding device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``1``) -> (``"cpu"`` or ``"cuda"``, id)."""
    if isinstance(device, int) and not isinstance(device, bool) and device >= 0:
        return "cuda", device  # FlagEmbedding: an int is a CUDA device
    if isinstance(device, str):
        match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip().lower())
        if match:
            return match.group(1), int(match.group(2) or 0)
    raise InputError(
        f"devices={device!r}: ONNX Runtime here runs on 'cpu' or a CUDA device ('cuda:N' or N, "
        "with TensorRT or CUDA providers); npu, mps and musa devices have no ONNX Runtime provider in this kit"
    )


def device_providers(devices: object) -> tuple[tuple[str, ...] | None, int | None]:
    """FlagEmbedding's ``devices`` -> (providers, device id); ``(None, None)`` for ``None``.

    One device only: FlagEmbedding starts one process per device for a list; here one
    session serves one device, so load one model per device instead."""
    if devices is None:
        return None, None
    items = list(devices) if isinstance(devices, (list, tuple)) else [devices]
    if not items:
        raise InputError("devices is an empty list: pass one device ('cpu', 'cuda:0'), or None for the default")
    if len(items) > 1:
        raise InputError(
            f"devices={devices!r}: one model runs on one device here (FlagEmbedding starts a process per "
            "device); pass one device, and load one model per device for more"
        )
    kind, index = _device(items[0])
    if kind == "cpu":
        return (CPU,), None
    have = available_providers()
    gpu = tuple(p for p in GPU_PROVIDERS if p in have) or (CUDA,)  # CUDA named: the fallback warning says why
    return (*gpu, CPU), index


def engine_options(
    *,
    variant: Variant | None,
    providers: Sequence[str] | None,
    devices: object = None,
    use_fp16: bool | None = None,
    use_bf16: bool = False,
    device_id: int = 0,
    cache_dir: str | Path | None = None,
    who: str = "M3Model",
    **loading: Any,
) -> EngineOptions:
    """The constructors' keyword arguments -> ``EngineOptions`` (the one place they are forwarded).

    - ``devices``: ``"cpu"`` -> the CPU provider; ``"cuda:N"``/``N`` -> TensorRT and CUDA
      where this ONNX Runtime has them, then the CPU, on device ``N``. Not with ``providers``.
    - ``use_fp16=True``: the fp16 variant where a GPU provider will run the model; without
      one the CPU default stays (one warning). ``False``: fp32 on GPUs (FlagEmbedding's
      full precision), the CPU default on the CPU. ``variant``, when given, wins.
    - ``use_bf16=True``: refused (no bfloat16 variant).
    """
    if use_bf16:
        raise InputError(
            "use_bf16=True: packages have no bfloat16 variant; pass use_fp16=True (fp16 on a GPU) or "
            "variant='fp32' / 'fp16' / 'int8'"
        )
    if devices is not None:
        if providers is not None:
            raise InputError(f"give devices={devices!r} or providers={list(providers)!r}, not both")
        providers, index = device_providers(devices)
        if index is not None:
            device_id = index
    if use_fp16 is not None and variant is None:
        have = available_providers()
        wanted = list(providers) if providers is not None else have
        on_gpu = any(p in GPU_PROVIDERS and p in have for p in wanted)
        if on_gpu:
            variant = "fp16" if use_fp16 else "fp32"
        elif use_fp16:
            warn_once(
                f"{who}(use_fp16=True): no GPU provider (TensorRT or CUDA) is available here, so the CPU "
                "default variant runs (int8 if the package has it, else fp32); FlagEmbedding also runs fp32 "
                "on the CPU. Pass variant='fp32' for its exact numbers"
            )
    return EngineOptions(
        variant=variant,
        providers=None if providers is None else tuple(providers),
        device_id=device_id,
        cache_dir=None if cache_dir is None else Path(cache_dir),
        **loading,
    )
