"""Torch-free BGE-M3 runtime: ``from m3_runtime import M3Model, M3Reranker``.

Importing this package imports neither torch nor transformers, nor ONNX Runtime
until a model is loaded.
"""

__version__ = "0.1.0"

from .contract import FORMAT_VERSION, VARIANTS
from .engine import Engine
from .errors import M3Error
from .model import M3Model
from .package import PackageError, load_package
from .reranker import M3Reranker

__all__ = ["FORMAT_VERSION", "VARIANTS", "Engine", "M3Error", "M3Model", "M3Reranker", "PackageError", "load_package"]
