"""The engine: one loaded package and the forward passes on it.

An ``Engine`` loads and verifies a package, opens its ONNX Runtime session, tokenizes
texts, plans batches (rows, padding, token budget) and runs one planned batch for the
outputs asked, returning arrays. It keeps no per-call state, so ``run`` may be called
from several threads at once, each on its own batch: ONNX Runtime's
``InferenceSession.run`` is thread-safe and releases the GIL. Everything shaped like a
library API sits on top of it: ``M3Model`` (FlagEmbedding's ``BGEM3FlagModel``), the
reranker facade and the server's scheduler.

    tokenize(texts, L)      -> list of token-id lists, <s> ... </s>, at most L long
    plan(ids)               -> [Batch]: (rows, seq) int64 input_ids / attention_mask
    run(batch, outputs)     -> {output name: array}, as in ``contract``
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .batching import pad_batch, plan_batches
from .contract import INPUT_NAMES, TOKENIZER_FILE, ModelKind, SpecialTokens, Variant, VariantInfo
from .errors import InputError, InputTypeError, RunError, UnsupportedOutput
from .package import Package, PackageError, load_package
from .session import (
    CPU,
    GPU_PROVIDERS,
    TENSORRT,
    SessionConfig,
    available_providers,
    create_session,
    default_cache_dir,
    default_variant,
    int8_activation_bits,
    release_heap,
    run_options,
)
from .tokenize import M3Tokenizer

if TYPE_CHECKING:
    import onnxruntime

# Default padded-token budget per forward pass (``max_batch_tokens=None``). On the CPU
# bigger batches push the activations out of cache (full-size int8 queries, 2 vCPUs:
# 1,062 tokens/s at 256, 997 at 512, 886 at 128, 639 at 4,096; fp32: 389 at 256, 149
# at 16,384).
GPU_BATCH_TOKENS = 16384
CPU_BATCH_TOKENS = 256
# FlagEmbedding 1.4's default ``batch_size``: most texts per forward pass.
DEFAULT_BATCH_SIZE = 256
# After a forward pass over at least this many tokens the C heap's free memory goes
# back to the OS (``session.release_heap``).
RELEASE_AFTER_TOKENS = 4096


def check_positive(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_unicode(text: str, name: str) -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate cannot be encoded as UTF-8,
    and the tokenizer would fail on it with an error that names nothing)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{name} is not valid Unicode: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}"
        ) from None


def variant_cache_key(info: VariantInfo) -> str:
    """Cache folder of a package variant (TensorRT engines): its name and a hash of all
    its files' SHA-256. The graph's alone would not do: re-exported weights of the same
    architecture leave the graph file unchanged and change only the data file."""
    digest = hashlib.sha256("".join(sorted(f.sha256 for f in info.files)).encode()).hexdigest()
    return f"{info.name}-{digest[:16]}"


@dataclass(frozen=True)
class Batch:
    """One forward pass: ``rows[r]`` is the caller's index of row ``r``."""

    rows: np.ndarray  # (batch,) int64
    input_ids: np.ndarray  # (batch, seq) int64, right-padded
    attention_mask: np.ndarray  # (batch, seq) int64

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)


@dataclass(frozen=True)
class EngineOptions:
    """How an ``Engine`` loads a package and runs it, declared once.

    ``M3Model`` and ``M3Reranker`` take these as keyword arguments (FlagEmbedding users
    pass keywords) and build one ``EngineOptions`` from them in one place
    (``compat.engine_options``); ``M3Model``'s docstring describes each field.
    ``cache_dir`` holds the verification record and TensorRT caches."""

    variant: Variant | None = None
    providers: tuple[str, ...] | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int | None = None
    exact_batches: bool = True
    pad_batches: bool = True
    verify: bool = True
    device_id: int = 0
    cache_dir: Path | None = None
    intra_op_threads: int = 0
    allow_spinning: bool = False
    workers: int = 1

    def __post_init__(self) -> None:  # lists and str paths in, hashable and typed out
        if self.providers is not None:
            if isinstance(self.providers, str):
                raise InputTypeError(f"providers must be a list of provider names, got {self.providers!r}")
            object.__setattr__(self, "providers", tuple(self.providers))
        if self.cache_dir is not None:
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))


class Engine:
    """A package's session and the work around it; see the module docstring.

    ``Engine(package_dir, EngineOptions(variant="fp32", workers=2))``.
    """

    def __init__(self, package_dir: str | Path, options: EngineOptions | None = None) -> None:
        self.options = options = EngineOptions() if options is None else options
        if not isinstance(options, EngineOptions):
            raise InputTypeError(f"options must be an EngineOptions, got {type(options).__name__}")
        variant, providers, batch_size = options.variant, options.providers, options.batch_size
        max_batch_tokens, exact_batches, pad_batches = (
            options.max_batch_tokens,
            options.exact_batches,
            options.pad_batches,
        )
        verify, device_id, cache_dir = options.verify, options.device_id, options.cache_dir
        intra_op_threads, allow_spinning, workers = options.intra_op_threads, options.allow_spinning, options.workers
        self.workers = check_positive(workers, "workers")
        self.package: Package = load_package(package_dir)
        manifest = self.package.manifest
        self.kind: ModelKind = manifest.kind
        have = available_providers()
        self.variant: Variant = variant or default_variant(
            list(manifest.variants), list(providers) if providers else have
        )
        info = self.package.variant(self.variant)
        cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir = cache_root
        self.package.verify(manifest.tokenizer_files + info.files, full=verify, record=cache_root / "verified.json")

        self.max_length = manifest.max_length
        self.hidden_size = manifest.hidden_size
        self.batch_size = check_positive(batch_size, "batch_size")
        if max_batch_tokens is not None:
            check_positive(max_batch_tokens, "max_batch_tokens")
        self.special: SpecialTokens = manifest.special_tokens
        self.outputs: tuple[str, ...] = self.kind.outputs
        # Most texts per ONNX Runtime call whatever batch_size a call asks for (None: no cap).
        self.rows_cap: int | None = 1 if (exact_batches and info.dynamic_activations) else None
        self.pad_limit = info.flash_min_tokens
        self.pad_batches = pad_batches
        self.tokenizer = M3Tokenizer(
            self.package.root / TOKENIZER_FILE, clean_up_tokenization_spaces=manifest.clean_up_tokenization_spaces
        )

        if providers is None:
            wanted = [p for p in GPU_PROVIDERS if p in info.providers and p in have] + [CPU]
        else:
            wanted = list(providers)
        config = SessionConfig(
            max_length=self.max_length,
            trt_max_batch=min(batch_size, 32),
            batch_tokens=max_batch_tokens or GPU_BATCH_TOKENS,
            device_id=device_id,
            cache_dir=cache_root,
            intra_op_threads=intra_op_threads,
            allow_spinning=allow_spinning,
            int8_bits=int8_activation_bits() if self.variant == "int8" else None,
        )
        graph = self.package.graph_path(self.variant)
        cache_key = variant_cache_key(info)
        # Why a provider asked for is not in use (one message per fallback; m3 check shows them).
        self.fallbacks: list[str] = []
        self.session: onnxruntime.InferenceSession
        self.session, self.providers = create_session(
            graph, wanted, config, cache_key=cache_key, fallbacks=self.fallbacks
        )
        if TENSORRT in self.providers:  # stay inside the TensorRT shape profile
            self.rows_cap = min(self.rows_cap or config.trt_max_batch, config.trt_max_batch)
        self._check_graph(graph)
        self._run_options = run_options(self.session)
        self.on_gpu = any(p in GPU_PROVIDERS for p in self.providers)
        if max_batch_tokens is None:
            max_batch_tokens = GPU_BATCH_TOKENS if self.on_gpu else CPU_BATCH_TOKENS
        self.max_batch_tokens: int = max_batch_tokens
        # Runs in flight, so that only the last of concurrent long runs trims the heap.
        self._in_flight = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._open = (graph, config, cache_key)
        self.long_session: onnxruntime.InferenceSession | None = None

    def open_long_session(self) -> bool:
        """Open a second CPU session of the graph for ``run(..., long_session=True)``.

        The server's scheduler opens it on one of its lower-priority threads: ONNX
        Runtime's intra-op threads are created with the session and keep the CPU priority
        of the thread that created them, so every thread of a pass on this session runs
        at that priority, and a short pass on ``session`` (its own threads) takes the
        cores from it. One session's threads serve all its concurrent runs, so a long
        pass on the main session would hold its pool thread at the server's priority.
        Costs a second copy of the prepacked weights (full-size int8: ~300 MB). Not on
        GPUs (the budget is above every text there; a copy would double GPU memory):
        False, and long passes use ``session``."""
        if self.on_gpu:
            return False
        if self.long_session is None:
            graph, config, cache_key = self._open  # where the main session fell back to the CPU too
            self.long_session, _ = create_session(graph, [CPU], config, cache_key=cache_key)
        return True

    # -- checks ---------------------------------------------------------------
    def check_length(self, value: object, name: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= self.max_length:
            raise InputError(
                f"{name} must be an integer in 2..{self.max_length} (the package's maximum), got {value!r}"
            )
        return value

    def check_outputs(self, names: Sequence[str], hint: str) -> None:
        """Refuse outputs this model kind does not have (``hint``: what to do instead)."""
        missing = [n for n in names if not self.kind.has(n)]
        if missing:
            raise UnsupportedOutput(
                f"{self.package.root} is a {self.kind.description} ({self.package.manifest.source.get('id')}): "
                f"it has no {', '.join(missing)} output; {hint}"
            )

    def _check_graph(self, graph: Path) -> None:
        inputs = [(i.name, i.type) for i in self.session.get_inputs()]
        expected_inputs = [(name, "tensor(int64)") for name in INPUT_NAMES]
        outputs = sorted(o.name for o in self.session.get_outputs())
        expected_outputs = sorted(self.outputs)
        if inputs != expected_inputs or outputs != expected_outputs:
            raise PackageError(
                f"{graph} does not have the M3 graph interface: expected inputs {expected_inputs} and outputs "
                f"{expected_outputs}, found inputs {inputs} and outputs {outputs}"
            )

    # -- work -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
        """Token ids per text (``<s> ... </s>``), truncated to ``max_length`` as FlagEmbedding does."""
        length = self.check_length(max_length, "max_length")
        for i, text in enumerate(texts):
            check_unicode(text, f"texts[{i}]")
        return self.tokenizer.encode(texts, length)

    def plan(self, ids: Sequence[Sequence[int]], *, batch_size: int | None = None) -> list[Batch]:
        """Length-sorted, padded batches under ``batch_size`` rows and the token budget."""
        size = self.batch_size if batch_size is None else check_positive(batch_size, "batch_size")
        if self.rows_cap is not None:
            size = min(size, self.rows_cap)
        if not ids:
            return []
        return [
            Batch(rows, *pad_batch([ids[i] for i in rows], self.special.pad))
            for rows in plan_batches(
                [len(x) for x in ids],
                batch_size=size,
                max_tokens=self.max_batch_tokens,
                pad=self.pad_batches,
                pad_limit=self.pad_limit,
            )
        ]

    def run(self, batch: Batch, outputs: Sequence[str], *, long_session: bool = False) -> dict[str, np.ndarray]:
        """One forward pass for ``outputs`` (graph output names). Safe from several threads.

        ``long_session``: on the session ``open_long_session`` opened (if it did)."""
        names = list(outputs)
        with self._lock:
            self._in_flight += 1
        try:
            feeds = {INPUT_NAMES[0]: batch.input_ids, INPUT_NAMES[1]: batch.attention_mask}
            session = self.long_session if long_session and self.long_session is not None else self.session
            results = session.run(names, feeds, self._run_options)
        except Exception as exc:
            raise RunError(f"ONNX Runtime failed on a batch of shape {batch.input_ids.shape}: {exc}") from exc
        finally:
            with self._lock:
                self._in_flight -= 1
                last = self._in_flight == 0
            # malloc_trim is process-wide: only when no other run is using the heap.
            if last and batch.input_ids.size >= RELEASE_AFTER_TOKENS:
                release_heap()
        return dict(zip(names, results, strict=True))

    def run_all(
        self, batches: Sequence[Batch], outputs: Sequence[str]
    ) -> Iterator[tuple[Batch, dict[str, np.ndarray]]]:
        """``run`` over ``batches``, ``workers`` at a time (one session, called from several threads).

        Yields ``(batch, results)`` in the order of ``batches``. With one worker, or one
        batch, the runs happen one after another on the calling thread."""
        if self.workers == 1 or len(batches) < 2:
            for batch in batches:
                yield batch, self.run(batch, outputs)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="m3-engine")
        futures = [self._pool.submit(self.run, batch, outputs) for batch in batches]
        try:
            for batch, future in zip(batches, futures, strict=True):
                yield batch, future.result()
        finally:
            for future in futures:
                future.cancel()

    def __repr__(self) -> str:
        return f"Engine({str(self.package.root)!r}, variant={self.variant!r}, providers={self.providers})"
