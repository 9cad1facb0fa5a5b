"""A debug setting that makes a served model fail like a dead GPU (for restart tests).

``CACE_SERVER_DEBUG_DEVICE_FAULT=N[:DELAY_S]``: after N successful model calls
(warm-up not counted), every model call waits DELAY_S seconds (default 0) and
raises ``torch.AcceleratorError("CUDA error: device-side assert triggered")``, the
exception torch raises when a CUDA kernel asserts. It exercises the whole path a
real dead device takes (detection, health, failing pending work, exit status) on
any machine. Unset (the default), models are served as they are.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from cace_server.engine.models import ModelWrapper, ServedModel
from cace_server.outputs import Outputs
from cace_server.structures import Prediction

ENV_VAR = "CACE_SERVER_DEBUG_DEVICE_FAULT"
FAULT_MESSAGE = (
    "CUDA error: device-side assert triggered\n(injected by CACE_SERVER_DEBUG_DEVICE_FAULT)"
)


def parse_fault(value: str) -> tuple[int, float]:
    """``"N"`` or ``"N:DELAY_S"`` -> (calls before the fault, delay of a failing call)."""
    calls, _, delay = value.partition(":")
    try:
        parsed = int(calls), float(delay or 0.0)
    except ValueError:
        raise ValueError(f"{ENV_VAR} must be N or N:DELAY_S, got {value!r}") from None
    if parsed[0] < 0 or parsed[1] < 0:
        raise ValueError(f"{ENV_VAR} must not be negative, got {value!r}")
    return parsed


class FaultyModel(ModelWrapper):
    """Forwards to ``inner``; model calls fail as a dead device once ``after`` succeeded."""

    def __init__(self, inner: ServedModel, after: int, delay_s: float) -> None:
        super().__init__(inner)
        self._left = after
        self._delay_s = delay_s
        self._lock = threading.Lock()

    def predict(self, structures: Sequence[Any], outputs: Outputs) -> list[Prediction]:
        with self._lock:
            healthy = self._left > 0
            self._left -= healthy
        if healthy:
            return self.inner.predict(structures, outputs)
        import torch

        time.sleep(self._delay_s)
        raise torch.AcceleratorError(FAULT_MESSAGE)


def inject_faults(model: ServedModel, environ: dict[str, str] | None = None) -> ServedModel:
    """``model``, wrapped to fail as configured by the debug variable when it is set."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    if not value:
        return model
    after, delay_s = parse_fault(value)
    return FaultyModel(model, after, delay_s)
