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

import numpy as np

from .contract import CPU, CUDA, INPUT_NAMES, INT8_INV_RANGE, INT8_ZERO_POINT, INT8_ZERO_POINT_3D, TENSORRT, Variant

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
    # Padded tokens per forward pass on a GPU (the engine's max_batch_tokens there).
    batch_tokens: int = 16384
    device_id: int = 0
    cache_dir: Path | None = None
    intra_op_threads: int = 0  # 0: ONNX Runtime picks the number of physical cores
    allow_spinning: bool = False
    # The int8 graph's activation bits (``int8_activation_bits``); None for other graphs.
    int8_bits: int | None = None


ACTIVATION_BITS_ENV = "M3_INT8_ACTIVATION_BITS"


def int8_activation_bits() -> int:
    """Bits of the int8 graph's per-token activations: 8 (as exported), or 7 from
    ``M3_INT8_ACTIVATION_BITS=7``.

    On x86 CPUs without VNNI (AVX2 only) ONNX Runtime's u8 x s8 ``MatMulIntegerToFloat``
    kernel (vpmaddubsw) adds two u8 x s8 products in int16 and saturates: activations up
    to 255 (zero point 128) times weights up to 127 reach 64,770. 7 bits (0..128 around
    64) never saturate, at half the activation resolution. Measured on an AMD EPYC (Zen
    3, AVX2, no VNNI), int8 dense cosine to fp32 (min / mean):
    - tiny checkpoints (hidden 64: weights near their column's maximum are common):
      8 bits 0.940 / 0.984, 7 bits 0.997 / 0.999 (reranker logits 0.82 / 0.27 from fp32);
    - all-MiniLM-L6-v2, real weights and text: 8 bits 0.9915 / 0.9968, 7 bits
      0.9874 / 0.9953, so 8 stays the default;
    - full-size random BGE-M3 at export: 8 bits 0.996 / 0.998."""
    value = os.environ.get(ACTIVATION_BITS_ENV)
    if value is None:
        return 8
    if value.strip() not in ("7", "8"):
        raise ValueError(f"{ACTIVATION_BITS_ENV} must be 7 or 8, got {value!r}")
    return int(value)


@functools.cache
def _seven_bit_activations() -> tuple[tuple[str, Any], ...]:
    """Initializers that give the int8 graph 7-bit activations: scale amax / 64, values
    0..128 around zero point 64 (kept alive here: ONNX Runtime holds no reference)."""
    ort = import_ort()
    values = {
        INT8_INV_RANGE: np.array(1 / 64, np.float32),
        INT8_ZERO_POINT: np.array(64, np.uint8),
        INT8_ZERO_POINT_3D: np.full((1, 1, 1), 64, np.uint8),
    }
    return tuple((name, ort.OrtValue.ortvalue_from_numpy(v)) for name, v in values.items())


def set_int8_activation_bits(options: Any, bits: int) -> None:
    """Give an int8 graph ``bits``-bit activations in these session options (8: as written)."""
    if bits not in (7, 8):
        raise ValueError(f"int8 activation bits must be 7 or 8, got {bits}")
    if bits == 7:
        for name, value in _seven_bit_activations():
            options.add_initializer(name, value)


def tensorrt_profile(max_length: int, max_rows: int, batch_tokens: int) -> dict[str, str]:
    """TensorRT's dynamic-shape profile (ONNX Runtime's ``trt_profile_*_shapes``) for
    every batch the engine's planner can send: 1 to ``max_rows`` rows (the engine caps
    rows at this on TensorRT) of 1 to ``max_length`` tokens. Optimised for a full
    batch of 512-token rows within the ``batch_tokens`` budget (or of the longest rows
    when ``max_length`` is shorter). Without a profile TensorRT rebuilds its engine (tens
    of seconds) whenever a new shape shows up; a batch outside it fails."""
    if max_length < 2 or max_rows < 1 or batch_tokens < 1:
        raise ValueError(
            f"bad TensorRT profile bounds: max_length {max_length}, rows {max_rows}, tokens {batch_tokens}"
        )
    opt_seq = min(512, max_length)
    opt_rows = max(1, min(max_rows, batch_tokens // opt_seq))

    def shape(rows: int, seq: int) -> str:
        return ",".join(f"{n}:{rows}x{seq}" for n in INPUT_NAMES)

    return {
        "trt_profile_min_shapes": shape(1, 1),
        "trt_profile_opt_shapes": shape(opt_rows, opt_seq),
        "trt_profile_max_shapes": shape(max_rows, max_length),
    }


def tensorrt_version() -> str:
    """The TensorRT library ONNX Runtime would load (``getInferLibVersion``, e.g. ``10.3.0``),
    or the installed ``tensorrt`` wheel's version, or ``unknown``."""
    import ctypes

    for name in ("libnvinfer.so", "libnvinfer.so.10", "libnvinfer.so.8", "nvinfer.dll"):
        try:
            number = int(ctypes.CDLL(name).getInferLibVersion())
        except (OSError, AttributeError, ValueError):
            continue
        major, rest = divmod(number, 10000) if number >= 10000 else divmod(number, 1000)
        return f"{major}.{rest // 100}.{rest % 100}"
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu11", "tensorrt-libs"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def tensorrt_cache_dir(cache_dir: Path) -> Path:
    """Engine and timing caches of one package variant (``cache_dir`` is keyed by the
    variant and its files' hashes, ``Engine``) for this TensorRT and ONNX Runtime: a
    changed package or library never reuses a stale engine."""
    return cache_dir / f"tensorrt-{tensorrt_version()}-ort-{import_ort().__version__}"


def _provider_options(name: str, config: SessionConfig, cache_dir: Path) -> dict[str, Any]:
    if name == TENSORRT:
        trt_cache = tensorrt_cache_dir(cache_dir)
        trt_cache.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": config.device_id,
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(trt_cache),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(trt_cache),
            **tensorrt_profile(config.max_length, config.trt_max_batch, config.batch_tokens),
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
    if config.int8_bits is not None:
        set_int8_activation_bits(options, config.int8_bits)
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


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (ONNX Runtime's span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def create_session(
    graph: Path,
    providers: list[str],
    config: SessionConfig,
    *,
    cache_key: str,
    fallbacks: list[str] | None = None,
) -> tuple[onnxruntime.InferenceSession, list[str]]:
    """Open ``graph`` on the first usable of ``providers`` (CPU always last).

    Providers ONNX Runtime does not have are dropped with one warning; a provider that
    fails to start (for example TensorRT libraries missing, a CUDA version mismatch, a
    TensorRT parser error) falls back to the CPU with one warning that names it and
    quotes ONNX Runtime's error. Each such message is also appended to ``fallbacks``.
    Returns the session and the providers it really uses.
    """

    def fell_back(message: str) -> None:
        if fallbacks is not None:
            fallbacks.append(message)
        _warn_once(message)

    ort = import_ort()
    have = set(ort.get_available_providers())
    wanted = [p for p in providers if p in have]
    missing = [p for p in providers if p not in have]
    if missing:
        fell_back(
            f"ONNX Runtime here has no {', '.join(missing)} (it has {', '.join(sorted(have))}); "
            f"using {', '.join([*wanted, CPU] if CPU not in wanted else wanted)}"
        )
    if CPU not in wanted:
        wanted.append(CPU)

    cache_dir = (config.cache_dir or default_cache_dir()) / cache_key
    provider_list = [(p, _provider_options(p, config, cache_dir)) for p in wanted]
    failed = False
    try:
        options = _session_options(ort, config, cpu_only=wanted == [CPU])
        session = ort.InferenceSession(str(graph), sess_options=options, providers=provider_list)
    except Exception as exc:
        if wanted == [CPU]:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc}") from None
        fell_back(f"{wanted[0]} could not be created; falling back to {CPU}. ONNX Runtime said: {_one_line(exc)}")
        failed = True
        try:
            options = _session_options(ort, config, cpu_only=True)
            session = ort.InferenceSession(str(graph), sess_options=options, providers=[CPU])
        except Exception as exc2:
            raise RuntimeError(f"ONNX Runtime cannot load {graph}: {exc2}") from None
    used = list(session.get_providers())
    if wanted[0] != CPU and used[0] != wanted[0] and not failed:
        fell_back(
            f"{wanted[0]} was requested but the session runs on {used[0]} "
            "(ONNX Runtime dropped it; its own error, if any, is in its log above)"
        )
    log.debug("opened %s on %s", graph.name, ", ".join(used))  # m3 serve logs what serves what
    return session, used
