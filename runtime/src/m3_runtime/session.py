"""ONNX Runtime sessions: the one place that picks providers and sets their options."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contract import CPU, CUDA, INPUT_NAMES, TENSORRT, Variant

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger("m3_runtime")

GPU_PROVIDERS = (TENSORRT, CUDA)

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            "m3-runtime needs ONNX Runtime: pip install 'm3-runtime[cpu]' (onnxruntime) "
            "or 'm3-runtime[gpu]' (onnxruntime-gpu), not both"
        ) from None
    return onnxruntime


def available_providers() -> list[str]:
    return list(import_ort().get_available_providers())


def default_variant(available_variants: list[str], providers: list[str] | None = None) -> Variant:
    """fp16 on TensorRT/CUDA when the package has it, else int8, else fp32 on the CPU."""
    usable = providers if providers is not None else available_providers()
    if any(p in GPU_PROVIDERS for p in usable) and "fp16" in available_variants:
        return "fp16"
    for name in ("int8", "fp32", "fp16"):
        if name in available_variants:
            return name
    raise ValueError("package has no variants")


@dataclass(frozen=True)
class SessionConfig:
    """What the providers need beyond the graph path."""

    max_length: int = 8192
    trt_max_batch: int = 32
    device_id: int = 0
    cache_dir: Path | None = None
    intra_op_threads: int = 0  # 0: ONNX Runtime picks the number of physical cores
    allow_spinning: bool = False


def _provider_options(name: str, config: SessionConfig, cache_dir: Path) -> dict[str, Any]:
    if name == TENSORRT:
        trt_cache = cache_dir / "tensorrt"
        trt_cache.mkdir(parents=True, exist_ok=True)

        def shape(batch: int, seq: int) -> str:
            return ",".join(f"{n}:{batch}x{seq}" for n in INPUT_NAMES)

        return {
            "device_id": config.device_id,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(trt_cache),
            # One profile covering every shape the batcher can send; without it TensorRT
            # rebuilds its engine (tens of seconds) whenever a new shape shows up.
            "trt_profile_min_shapes": shape(1, 1),
            "trt_profile_opt_shapes": shape(min(8, config.trt_max_batch), min(512, config.max_length)),
            "trt_profile_max_shapes": shape(config.trt_max_batch, config.max_length),
        }
    if name == CUDA:
        return {"device_id": config.device_id, "cudnn_conv_algo_search": "HEURISTIC"}
    return {}


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where there is none (looked up once)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_heap() -> None:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim``; elsewhere nothing).

    With the CPU arena off, ONNX Runtime's tensors come from malloc, and after a long
    input glibc keeps freed blocks that later inputs do not fully reuse: int8, one
    8,192-token text, activation peak 571 MB for one pass, 604 MB over three passes,
    593 MB over three with a trim after each (2-vCPU box). The model calls this after
    a forward pass over ``RELEASE_AFTER_TOKENS`` tokens or more: the trim after that
    8,192-token run took 3.6 ms, the run 37 s."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "m3-runtime"


def create_session(
    graph: Path,
    providers: list[str],
    config: SessionConfig,
    *,
    cache_key: str,
) -> tuple[onnxruntime.InferenceSession, list[str]]:
    """Open ``graph`` on the first usable of ``providers`` (CPU always last).

    Providers ONNX Runtime does not have are dropped with one warning; a provider that
    fails to start (for example TensorRT libraries missing) falls back to the CPU with
    one warning. Returns the session and the providers it really uses.
    """
    ort = import_ort()
    have = set(ort.get_available_providers())
    wanted = [p for p in providers if p in have]
    missing = [p for p in providers if p not in have]
    if missing:
        _warn_once(f"ONNX Runtime here has no {', '.join(missing)}; using {', '.join([*wanted, CPU])}")
    if CPU not in wanted:
        wanted.append(CPU)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.intra_op_threads
    # Spinning threads burn the cores between calls and cost up to 1.6x at short inputs
    # when the cores are shared; on a dedicated machine they gave +20% on short queries.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    # No CPU arena: the arena keeps its peak forever (one 8,192-token text would pin
    # ~150 MB more for the process's life) and measured no faster here (int8, 2 vCPUs:
    # 3.57 s vs 3.55 s on 64 queries; 8,192 tokens: activation peak 580 MB vs 726 MB).
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3

    cache_dir = (config.cache_dir or default_cache_dir()) / cache_key
    provider_list = [(p, _provider_options(p, config, cache_dir)) for p in wanted]
    try:
        session = ort.InferenceSession(str(graph), sess_options=options, providers=provider_list)
    except Exception as exc:
        if wanted == [CPU]:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc}") from None
        _warn_once(f"{wanted[0]} failed to start ({exc}); falling back to {CPU}")
        try:
            session = ort.InferenceSession(str(graph), sess_options=options, providers=[CPU])
        except Exception as exc2:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc2}") from None
    used = list(session.get_providers())
    if wanted[0] != CPU and used[0] != wanted[0]:
        _warn_once(f"{wanted[0]} was requested but the session runs on {used[0]}")
    log.info("opened %s on %s", graph.name, ", ".join(used))
    return session, used
