"""Torch-free BGE-M3 runtime: ``from m3_runtime import M3Model``.

Importing this package imports neither torch nor transformers, nor ONNX Runtime
until a model is loaded.
"""

from .contract import FORMAT_VERSION, VARIANTS
from .model import M3Model
from .package import PackageError, load_package

__all__ = ["FORMAT_VERSION", "VARIANTS", "M3Model", "PackageError", "load_package"]
__version__ = "0.1.0"
