"""The serving engine: one queue, one worker that owns the device, batched evaluation.

Frontends (i-PI connections, HTTP) build :class:`~cace_server.structures.Structure`
objects and ``await engine.evaluate([...])`` (or ``engine.evaluate_sync`` from a
thread); concurrent requests are evaluated together in batches::

    from cace_server.engine import Engine, EngineSettings

    settings = EngineSettings(device="cuda", dtype="float32")
    async with Engine({"water": "water.safetensors"}, settings=settings) as engine:
        predictions = await engine.evaluate(structures)  # with the default model
        outcomes = await engine.evaluate(structures, return_exceptions=True)
        engine.snapshot()  # counters for /metrics

Every failure is an :class:`EngineError` subclass (``kind`` names it for metrics);
a structure that fails does not fail the others of its request or batch.
"""

from cace_server.engine.batching import LaneTiming
from cace_server.engine.engine import Engine
from cace_server.engine.errors import (
    DeviceFailed,
    EngineClosed,
    EngineError,
    EvaluationError,
    InvalidStructure,
    NonFiniteResult,
    NotReady,
    OutOfMemory,
    Overloaded,
    SwapRefused,
    UnknownModel,
    UnsupportedOutput,
    is_fatal_device_error,
    is_out_of_memory,
)
from cace_server.engine.models import ModelInfo, ServedModel
from cace_server.engine.settings import EngineSettings
from cace_server.engine.stats import HistogramSnapshot, StatsSnapshot
from cace_server.engine.steps import StepGroup

__all__ = [
    "DeviceFailed",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineSettings",
    "EvaluationError",
    "HistogramSnapshot",
    "InvalidStructure",
    "LaneTiming",
    "ModelInfo",
    "NonFiniteResult",
    "NotReady",
    "OutOfMemory",
    "Overloaded",
    "ServedModel",
    "StatsSnapshot",
    "StepGroup",
    "SwapRefused",
    "UnknownModel",
    "UnsupportedOutput",
    "is_fatal_device_error",
    "is_out_of_memory",
]
