"""Why an evaluation failed: one exception type per cause, all under :class:`EngineError`.

Frontends map these to their own error replies (HTTP status codes, i-PI
connection handling); ``kind`` is the stable label used in statistics and logs.
"""

from __future__ import annotations

from cace_server.structures import StructureError


class EngineError(Exception):
    """Base class of every error the engine hands to a caller."""

    kind = "engine_error"

    def __init__(self, message: str, *, index: int | None = None) -> None:
        # ``index``: position of the failing structure within its request, when the
        # error concerns one structure rather than the whole request.
        if index is not None:
            message = f"structure {index}: {message}"
        super().__init__(message)
        self.index = index


class InvalidStructure(EngineError, StructureError):
    """The structure cannot be evaluated by this model (element, cell, shapes...)."""

    kind = "invalid_structure"


class UnknownModel(EngineError, LookupError):
    """The request names a model the engine does not serve."""

    kind = "unknown_model"


class SwapRefused(EngineError, ValueError):
    """A new model version was refused (``Engine.swap_model``); the old one keeps serving.

    ``reason``: ``"bad_model"`` (unreadable, damaged, does not load or warm up) or
    ``"species_in_use"`` (lacks an element a live trajectory uses).
    """

    kind = "swap_refused"

    def __init__(self, message: str, *, reason: str = "bad_model") -> None:
        super().__init__(message)
        self.reason = reason


class UnsupportedOutput(EngineError, ValueError):
    """The request asks for an output the model does not compute (e.g. BEC)."""

    kind = "unsupported_output"


class NonFiniteResult(EngineError, ArithmeticError):
    """The model produced NaN or infinity for this structure."""

    kind = "non_finite"


class OutOfMemory(EngineError, MemoryError):
    """The structure does not fit in the device's memory even when evaluated alone."""

    kind = "out_of_memory"


class EvaluationError(EngineError, RuntimeError):
    """The model raised an unexpected error for this structure."""

    kind = "evaluation_error"


class Overloaded(EngineError):
    """The request queue is full; try again later."""

    kind = "overloaded"


class NotReady(EngineError):
    """The engine has not finished starting (loading, warm-up)."""

    kind = "not_ready"


class EngineClosed(EngineError):
    """The engine was shut down before the request could be evaluated."""

    kind = "engine_closed"


class DeviceFailed(EngineError):
    """The device's context is dead (device-side assert, illegal memory access...).

    Nothing can run on it any more in this process: the engine fails what it holds,
    reports unhealthy and the server exits non-zero so that it is restarted.
    """

    kind = "device_failed"


_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "cublas_status_alloc_failed",  # cuBLAS could not get its workspace: memory, not a dead GPU
)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the device (or host) ran out of memory.

    torch raises ``torch.cuda.OutOfMemoryError`` (a RuntimeError) on CUDA, but a
    plain RuntimeError on the CPU allocator and on some other backends, so the
    message is checked too.
    """
    if isinstance(exc, MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return any(m in text for m in _OOM_MESSAGES)


# What CUDA says when its context is poisoned: every later call on the device fails
# too (the CUDA runtime's "sticky" errors), so retrying smaller batches cannot help.
_FATAL_MESSAGES = (
    "device-side assert",
    "illegal memory access",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cublas_status_internal_error",
    "cudnn_status_execution_failed",
    "cuda error: an illegal",
    "cuda error: unknown error",
    "cuda error: the launch timed out",
    "cuda error: uncorrectable ecc error",
    "cuda driver error",
)


def is_fatal_device_error(exc: BaseException) -> bool:
    """Whether ``exc`` means the device context is dead (not out of memory).

    torch raises ``torch.AcceleratorError`` (a RuntimeError) for CUDA runtime errors
    since 2.8, and plain RuntimeErrors from cuBLAS/cuDNN, so the type name and the
    message are both checked.
    """
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    if type(exc).__name__ == "AcceleratorError":
        return True
    text = str(exc).lower()
    return any(m in text for m in _FATAL_MESSAGES)
