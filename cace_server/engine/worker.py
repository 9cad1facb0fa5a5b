"""The worker: the one thread that owns the device and runs the models.

It loads the models, warms them up, then takes batches from the queue, runs one
``model.predict`` per batch and resolves every item's future. On out-of-memory it
splits the batch in halves and retries; any other model error is isolated the same
way, so only the structure that really fails gets an error.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from cace_server.engine.batching import PendingQueue, WorkItem, reject, resolve
from cace_server.engine.errors import (
    EvaluationError,
    NonFiniteResult,
    OutOfMemory,
    is_out_of_memory,
)
from cace_server.engine.models import (
    ModelInfo,
    ModelSource,
    ServedModel,
    describe,
    materialize,
    warmup_structure,
)
from cace_server.engine.settings import EngineSettings
from cace_server.engine.stats import EngineStats
from cace_server.structures import Prediction

logger = logging.getLogger("cace_server.engine")

_CHECKED_ARRAYS = ("forces", "stress", "virial", "energies", "charges", "dipole", "bec")


def non_finite_fields(prediction: Prediction) -> list[str]:
    """Names of the outputs that contain NaN or infinity."""
    bad = [] if math.isfinite(prediction.energy) else ["energy"]
    for name in _CHECKED_ARRAYS:
        value = getattr(prediction, name)
        if value is not None and not np.all(np.isfinite(value)):
            bad.append(name)
    return bad


def _first_line(text: str, limit: int = 300) -> str:
    """Out-of-memory messages run to many lines of allocator advice; keep the gist."""
    lines = text.strip().splitlines()
    return lines[0][:limit] if lines else ""


def _predict(model: ServedModel, prepared: list[Any], stress: bool, bec: bool) -> list[Prediction]:
    if bec:
        return model.predict(prepared, stress=stress, bec=True)
    return model.predict(prepared, stress=stress)


class Worker:
    """Owns the models and the device; everything torch happens on its thread."""

    def __init__(
        self,
        sources: Mapping[str, ModelSource],
        default: str,
        settings: EngineSettings,
        queue: PendingQueue,
        stats: EngineStats,
    ) -> None:
        self._sources = dict(sources)
        self._default = default
        self._settings = settings
        self._queue = queue
        self._stats = stats
        self.models: dict[str, ServedModel] = {}
        self.infos: dict[str, ModelInfo] = {}
        self.started = threading.Event()  # set when start-up finished, failed or not
        self.ready = threading.Event()  # set when start-up succeeded
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cace-engine-worker", daemon=True)

    # -- thread control -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end; True when it did."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # -- start-up ------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._start_up()
        except BaseException as exc:
            logger.error(
                "engine start-up failed: %s: %s",
                type(exc).__name__,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            self.error = exc
            self.started.set()
            return
        self.ready.set()
        self.started.set()
        self._serve()

    def _start_up(self) -> None:
        settings = self._settings
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        for name, source in self._sources.items():
            model = materialize(source, settings.device, settings.dtype)
            long_range = settings.long_range_for(name)
            configure = getattr(model, "configure_long_range", None)
            if long_range and configure is not None:
                configure(**long_range)
                logger.info("model %r long range: %s", name, long_range)
            path = str(source) if isinstance(source, (str, os.PathLike)) else None
            self.models[name] = model
            self.infos[name] = describe(name, model, default=name == self._default, source=path)
            info = self.infos[name]
            logger.info(
                "model %r loaded: %d elements, cutoff %.2f Å, %s on %s, %d parameters",
                name,
                len(info.elements),
                info.cutoff,
                info.dtype,
                info.device,
                info.n_parameters,
            )
        if settings.warmup:
            for name, model in self.models.items():
                self._warm_up(name, model)
        # The sources (paths or the caller's objects) are no longer needed.
        self._sources.clear()

    def _warm_up(self, name: str, model: ServedModel) -> None:
        info = self.infos[name]
        structure = warmup_structure(info)
        start = time.monotonic()
        prediction = _predict(model, [model.prepare(structure)], True, "bec" in info.outputs)[0]
        bad = non_finite_fields(prediction)
        if bad:
            logger.warning("warm-up of model %r gave NaN/inf in %s", name, ", ".join(bad))
        logger.info(
            "model %r warmed up in %.3f s (%d atoms)",
            name,
            time.monotonic() - start,
            len(structure),
        )

    # -- serving -------------------------------------------------------------------------------
    def _serve(self) -> None:
        settings = self._settings
        wait_s = settings.batch_wait_ms / 1000.0
        while True:
            batch = self._queue.take_batch(
                settings.max_batch_atoms, settings.max_batch_pairs, wait_s
            )
            if batch is None:
                return
            self._stats.leave_queue(len(batch))
            # Callers that cancelled while waiting cost no compute.
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if len(live) < len(batch):
                self._stats.error("cancelled", len(batch) - len(live))
            if not live:
                continue
            start = time.monotonic()
            self._stats.batch_started(
                len(live), sum(i.n_atoms for i in live), [start - i.submitted for i in live]
            )
            try:
                self._run_batch(live)
            except Exception as exc:  # a bug here must cost one batch, not the worker
                logger.exception("engine worker failed on a batch")
                for item in live:
                    reject(item, EvaluationError(f"internal error: {exc}"), self._stats)
            finally:
                self._stats.batch_finished(time.monotonic() - start)

    def _run_batch(self, items: list[WorkItem]) -> None:
        name = items[0].model
        model = self.models[name]
        stress = any(item.stress for item in items)
        bec = any(item.bec for item in items)
        parts = [items]
        while parts:
            part = parts.pop()
            predictions, failure, oom = self._call(model, part, stress, bec)
            if predictions is not None:
                self._deliver(name, part, predictions)
                continue
            if oom:
                self._release_memory(name)
            if len(part) > 1:
                # Halve and retry: for out-of-memory so that smaller batches fit, for
                # other errors so that only the structure at fault fails.
                if oom:
                    self._stats.oom_split()
                    logger.info("out of memory on %d structures, splitting: %s", len(part), failure)
                mid = len(part) // 2
                parts.append(part[mid:])
                parts.append(part[:mid])
                continue
            item = part[0]
            if oom:
                error: EvaluationError | OutOfMemory = OutOfMemory(
                    f"{item.n_atoms} atoms / {item.n_pairs} pairs do not fit in memory "
                    f"even alone ({_first_line(failure)})",
                    index=item.index,
                )
            else:
                error = EvaluationError(f"model {name!r} failed: {failure}", index=item.index)
            logger.warning("request failed: %s", error)
            reject(item, error, self._stats)

    def _call(
        self, model: ServedModel, part: list[WorkItem], stress: bool, bec: bool
    ) -> tuple[list[Prediction] | None, str, bool]:
        """One forward pass: (predictions, "", False) or (None, failure message, is_oom)."""
        self._stats.model_call()
        try:
            predictions = _predict(model, [item.prepared for item in part], stress, bec)
        except Exception as exc:
            # Only the message leaves this block: the traceback would keep the
            # failed pass's tensors alive while the halves are retried.
            oom = is_out_of_memory(exc)
            if not oom:
                logger.debug("model call on %d structures failed", len(part), exc_info=True)
            return None, f"{type(exc).__name__}: {exc}", oom
        if len(predictions) != len(part):
            message = f"model returned {len(predictions)} predictions for {len(part)} structures"
            return None, message, False
        return predictions, "", False

    def _deliver(self, name: str, part: list[WorkItem], predictions: list[Prediction]) -> None:
        for item, prediction in zip(part, predictions, strict=True):
            bad = non_finite_fields(prediction)
            if bad:
                message = f"model {name!r} returned NaN or infinity in {', '.join(bad)}"
                logger.warning("%s (%d atoms)", message, item.n_atoms)
                reject(item, NonFiniteResult(message, index=item.index), self._stats)
                continue
            if not item.stress:
                prediction.stress = None
                prediction.virial = None
            if not item.bec:
                prediction.bec = None
            prediction.extras.setdefault("model", name)
            resolve(item, prediction)

    def _release_memory(self, name: str) -> None:
        if self.infos[name].device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
