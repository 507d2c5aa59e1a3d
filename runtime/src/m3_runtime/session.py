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

    Without the shared CPU arena (``CPU_ARENA``: GPU sessions, or where it could not be
    registered), ONNX Runtime's tensors come from malloc, and after a long input glibc
    keeps freed blocks that later inputs do not fully reuse (measured then: int8, one
    8,192-token text, activation peak 571 MB for one pass, 604 MB over three passes,
    593 MB over three with a trim after each, 2-vCPU box). The engine calls this after
    a forward pass over ``RELEASE_AFTER_TOKENS`` tokens or more: the trim after that
    8,192-token run took 3.6 ms, the run 37 s."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ONNX Runtime's BFC arena for the CPU sessions of this process, shared by them. glibc's
# heap, which ORT's tensors come from without an arena, keeps a multiple of what a run
# holds live (int8, full-size, 2 vCPUs, glibc 2.36 and 2.41 alike: a 4 x 64-token batch
# +107 MB against +22 MB live, one 1,024-token text +488 MB against +72, 16 passages one
# after another leave 540 MB of heap behind). One 32 MB first region serves short passes;
# growth regions start at 256 MB, so a long text's tensors split a few large regions
# instead of stranding many small ones (an 8,192-token text: activation peak 595-602 MB
# with these sizes, 663-705 MB with smaller ones). Free regions go back to the OS after
# every run (``run_options``); RSS counts only the pages a region has touched.
CPU_ARENA = {
    "arena_extend_strategy": 0,  # kNextPowerOfTwo
    "initial_chunk_size_bytes": 32 << 20,
    "initial_growth_chunk_size_bytes": 256 << 20,
}


@functools.cache
def _register_cpu_arena() -> bool:
    """Register ``CPU_ARENA`` with ONNX Runtime's environment, once per process.

    False where it cannot be registered: the sessions then allocate from malloc."""
    ort = import_ort()
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    try:
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(CPU_ARENA))
    except Exception as exc:  # e.g. the application registered its own: that one serves
        already = "already" in str(exc).lower()
        if not already:
            _warn_once(f"ONNX Runtime's shared CPU arena could not be registered ({exc}); using malloc")
        return already
    return True


def _session_options(ort: Any, config: SessionConfig, *, cpu_only: bool) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = config.intra_op_threads
    # Spinning threads burn the cores between calls and cost up to 1.6x at short inputs
    # when the cores are shared; on a dedicated machine they gave +20% on short queries.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.allow_spinning else "0")
    # The session's own arena would keep its peak forever (one 8,192-token text pins its
    # activations for the process's life): on the CPU the shared, shrinking one above.
    options.enable_cpu_mem_arena = cpu_only and _register_cpu_arena()
    if options.enable_cpu_mem_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    return options


def run_options(session: onnxruntime.InferenceSession) -> onnxruntime.RunOptions | None:
    """Options for ``session.run``: with the shared CPU arena, free regions go back after each run."""
    try:
        shared = session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    except Exception:  # ONNX Runtime raises for a key that was never set
        shared = False
    if not shared:
        return None
    options = import_ort().RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


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

    cache_dir = (config.cache_dir or default_cache_dir()) / cache_key
    provider_list = [(p, _provider_options(p, config, cache_dir)) for p in wanted]
    try:
        options = _session_options(ort, config, cpu_only=wanted == [CPU])
        session = ort.InferenceSession(str(graph), sess_options=options, providers=provider_list)
    except Exception as exc:
        if wanted == [CPU]:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc}") from None
        _warn_once(f"{wanted[0]} failed to start ({exc}); falling back to {CPU}")
        try:
            options = _session_options(ort, config, cpu_only=True)
            session = ort.InferenceSession(str(graph), sess_options=options, providers=[CPU])
        except Exception as exc2:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc2}") from None
    used = list(session.get_providers())
    if wanted[0] != CPU and used[0] != wanted[0]:
        _warn_once(f"{wanted[0]} was requested but the session runs on {used[0]}")
    log.info("opened %s on %s", graph.name, ", ".join(used))
    return session, used
