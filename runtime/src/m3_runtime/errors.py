"""The runtime's user-facing errors: one base class, so callers catch these and not bugs.

``M3Error`` is the base of everything the runtime raises on purpose for bad input, a
bad package or a failed run. Each also derives from the built-in exception that
FlagEmbedding users already catch (``ValueError``, ``TypeError``, ``RuntimeError``),
so code written against the reference keeps working. The server and the CLI catch
``M3Error`` only: any other exception is a bug and is reported as one.
"""

from __future__ import annotations


class M3Error(Exception):
    """Base class of the runtime's deliberate errors."""


class InputError(M3Error, ValueError):
    """An argument's value is refused (the message names the argument and the value)."""


class InputTypeError(M3Error, TypeError):
    """An argument has the wrong type (the message names it and its index)."""


class UnsupportedOutput(InputError):
    """The package's model kind has no such output (e.g. sparse weights from a dense-only model)."""


class RunError(M3Error, RuntimeError):
    """ONNX Runtime failed on a batch; the original exception is the ``__cause__``."""


class Overloaded(M3Error):
    """More work is waiting than the scheduler accepts (try again shortly)."""


class ShuttingDown(Overloaded):
    """The scheduler is closing and takes no more work."""
