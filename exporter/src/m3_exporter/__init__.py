"""Export BGE-M3 (backbone + dense, sparse and ColBERT heads) to one ONNX graph per variant."""

from .checkpoint import CheckpointError
from .export import export_package
from .graphs import ExportError

__all__ = ["CheckpointError", "ExportError", "export_package"]
__version__ = "0.1.0"
