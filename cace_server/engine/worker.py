"""The worker: the one thread that owns a device and runs the models on it.

It loads the models, warms them up, then takes batches from the queue, runs one
``model.predict`` per batch and resolves every item's future. On out-of-memory it
splits the batch in halves and retries; any other model error is isolated the same
way, so only the structure that really fails gets an error. A fatal device error
(a dead CUDA context) is different: nothing can run on that device any more, so
the worker fails its batch with :class:`DeviceFailed`, reports to the engine and
stops. With several devices there is one worker per device, all draining one queue.

Between batches the worker runs its tasks (:meth:`Worker.run_task`): loading and
warming a new model version beside the served one (``Engine.swap_model``) and
releasing an old one. Items carry the version they were submitted for, so a batch
is computed by the version its items were queued for.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from cace_server.capture import Capture
from cace_server.engine.batching import PendingQueue, WorkItem, reject, resolve
from cace_server.engine.compiling import compile_warmup, eager, enable_compiled
from cace_server.engine.errors import (
    DeviceFailed,
    EvaluationError,
    NonFiniteResult,
    OutOfMemory,
    is_fatal_device_error,
    is_out_of_memory,
)
from cace_server.engine.faults import inject_faults
from cace_server.engine.models import (
    ModelInfo,
    ModelSource,
    ServedModel,
    describe,
    materialize,
    model_sha,
    warmup_batches,
)
from cace_server.engine.settings import EngineSettings
from cace_server.engine.stats import EngineStats
from cace_server.host_memory import GrowthTrim
from cace_server.outputs import Outputs
from cace_server.structures import Prediction

if TYPE_CHECKING:
    from cace_server.model.io import ModelFilePolicy

logger = logging.getLogger("cace_server.engine")


def non_finite_fields(prediction: Prediction) -> list[str]:
    """Names of the outputs that contain NaN or infinity."""
    bad = [] if math.isfinite(prediction.energy) else ["energy"]
    for name, value in prediction.array_outputs().items():
        if not np.all(np.isfinite(value)):
            bad.append(name)
    return bad


def _first_line(text: str, limit: int = 300) -> str:
    """Out-of-memory messages run to many lines of allocator advice; keep the gist."""
    lines = text.strip().splitlines()
    return lines[0][:limit] if lines else ""


class _DeviceDead(Exception):
    """Raised inside the worker when a model call hit a fatal device error."""


def synchronize(device: str | None) -> None:
    """Wait for the device's queued kernels, so that their errors surface here.

    CUDA reports a failed kernel at the next synchronising call; without this, a
    device-side assert of one batch could be charged to the next one.
    """
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


class Worker:
    """Owns its device's copy of the models: loads, warms up and runs them on its thread.

    Model calls (``predict``) happen only here. The engine's prepare threads build
    neighbour lists with the first worker's copy (``Engine._catalogue``), which for a
    CUDA model runs small kernels on that device from those threads.
    """

    def __init__(
        self,
        sources: Mapping[str, ModelSource],
        default: str,
        settings: EngineSettings,
        queue: PendingQueue,
        stats: EngineStats,
        *,
        device: str | None = None,
        label: str | None = None,
        on_fatal: Callable[[Worker, str], None] | None = None,
        capture: Capture | None = None,
        model_files: ModelFilePolicy | None = None,
        name: str = "cace-engine-worker",
    ) -> None:
        self._sources = dict(sources)
        self._model_files = model_files
        self._default = default
        self._settings = settings
        self._queue = queue
        self._stats = stats
        self.device = device
        #: how statistics name this worker: its device, numbered if two share one
        self.label = label or device or "default"
        self._on_fatal = on_fatal
        self._capture = capture
        #: the serving version of each model (and its description)
        self.models: dict[str, ServedModel] = {}
        self.infos: dict[str, ModelInfo] = {}
        # every loaded version, (name, version number) -> model: the serving ones and,
        # during a swap, the new one or an old one that queued work still refers to
        self._versions: dict[tuple[str, int], ServedModel] = {}
        self._shas: dict[tuple[str, int], str | None] = {}
        self._tasks: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._tasks_lock = threading.Lock()
        self.started = threading.Event()  # set when start-up finished, failed or not
        self.ready = threading.Event()  # set when start-up succeeded
        self.error: BaseException | None = None
        #: why the device died (a short text), once it did
        self.fatal: str | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

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
        self._run_tasks(RuntimeError("the engine worker stopped"))

    def _start_up(self) -> None:
        settings = self._settings
        if settings.torch_threads is not None:
            import torch

            torch.set_num_threads(settings.torch_threads)
        if self.device is not None and self.device.startswith("cuda:"):
            import torch

            # Kernels, cuBLAS handles and the caching allocator of this thread use the
            # worker's device, not cuda:0, also where a library omits the index.
            torch.cuda.set_device(self.device)
        for name, source in self._sources.items():
            self.models[name], self.infos[name] = self._load(name, source)
        if settings.warmup:
            for name, model in self.models.items():
                self._warm_up(name, model)
        # Only with the debug setting (see faults.py): after warm-up, so it counts traffic.
        self.models = {name: inject_faults(model) for name, model in self.models.items()}
        for name, model in self.models.items():
            self._versions[(name, 0)] = model
            self._shas[(name, 0)] = self.infos[name].sha
        # The sources (paths or the caller's objects) are no longer needed.
        self._sources.clear()

    def _load(self, name: str, source: ModelSource) -> tuple[ServedModel, ModelInfo]:
        settings = self._settings
        # loading first: it names a missing or bad file (a committee member) clearly
        model = materialize(source, self.device, settings.dtype, self._model_files)
        sha = model_sha(source)
        long_range = settings.long_range_for(name)
        if long_range:
            model.configure_long_range(**long_range)
            logger.info("model %r long range: %s", name, long_range)
        compile_mode = settings.compile_for(name)
        if compile_mode is not None:
            n = enable_compiled(name, model, compile_mode, settings.compile_cache_dir)
            logger.info("model %r: %d compiled call(s), mode %s", name, n, compile_mode)
        path = str(source) if isinstance(source, (str, os.PathLike)) else None
        info = describe(name, model, default=name == self._default, source=path, sha=sha)
        if self._capture is not None:
            self._capture.check_model(name, info.outputs)
        logger.info(
            "model %r (%s) loaded: %d elements, cutoff %.2f Å, %s on %s, %d parameters",
            name,
            sha,
            len(info.elements),
            info.cutoff,
            info.dtype,
            info.device,
            info.n_parameters,
        )
        return model, info

    # -- versions (run on this thread through run_task) -----------------------------------------
    def run_task(self, task: Callable[[], Any]) -> Future[Any]:
        """Run ``task`` on this thread between batches; its result or error in the future."""
        future: Future[Any] = Future()
        with self._tasks_lock:
            self._tasks.append((task, future))
        self._queue.wake()
        return future

    def _has_tasks(self) -> bool:
        return bool(self._tasks)

    def _run_tasks(self, error: BaseException | None = None) -> None:
        while True:
            with self._tasks_lock:
                if not self._tasks:
                    return
                task, future = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            if error is not None:
                future.set_exception(error)
                continue
            try:
                future.set_result(task())
            except BaseException as exc:
                future.set_exception(exc)

    def load_version(self, name: str, version: int, source: ModelSource) -> ModelInfo:
        """Load and warm up a new version of model ``name`` beside the serving one.

        Nothing refers to ``version`` until the engine commits the swap, so the
        serving version keeps computing every batch meanwhile.
        """
        model, info = self._load(name, source)
        if self._settings.warmup:
            self._warm_up(name, model, info)
        self._versions[(name, version)] = inject_faults(model)
        self._shas[(name, version)] = info.sha
        return info

    def adopt_version(self, name: str, version: int, info: ModelInfo) -> None:
        """``version`` is now the one new work of ``name`` gets (called at commit)."""
        self.models[name] = self._versions[(name, version)]
        self.infos[name] = info

    def drop_version(self, name: str, version: int) -> None:
        """Release a version nothing refers to any more (its memory, on a GPU too)."""
        model = self._versions.pop((name, version), None)
        self._shas.pop((name, version), None)
        if model is not None:
            self._release_memory_of(model)

    def version_model(self, name: str, version: int) -> ServedModel:
        return self._versions[(name, version)]

    def _warm_up(self, name: str, model: ServedModel, info: ModelInfo | None = None) -> None:
        """Run the shapes real traffic brings before /readyz says ready.

        An open cluster (direct long-range sum), a periodic box (reciprocal sum), a
        batch of several boxes and, on a GPU, the largest batch the settings allow
        (kernel selection, cuBLAS workspaces, the caching allocator's pool). The CPU
        has no such first-call costs, so it skips the largest batch: warm-up stays
        about a second there. Models with Born effective charges compute them too.
        """
        info = info if info is not None else self.infos[name]
        on_gpu = str(model.device).startswith("cuda")
        limit = self._settings.max_batch_atoms if on_gpu else 0
        start = time.monotonic()
        atoms = 0
        batches = warmup_batches(
            info,
            largest_atoms=limit,
            largest_pairs=self._settings.max_batch_pairs,
            prepare=model.prepare,
            cost=model.batch_cost,
        )
        # Warm-up runs what a request can ask: every output the model offers.
        everything = Outputs(info.outputs)
        for k, (label, structures) in enumerate(batches):
            try:
                with eager(model):
                    predictions = model.predict(structures, everything)
                synchronize(self.device)
            except Exception as exc:
                if not is_out_of_memory(exc) or k == 0:
                    raise
                # Serving splits batches that do not fit (and refuses structures that
                # do not fit alone); say so, but serve.
                logger.warning(
                    "warm-up of model %r: %s ran out of memory (%s); batches that large "
                    "will be split (lower max_batch_atoms to avoid it)",
                    name,
                    label,
                    _first_line(str(exc)),
                )
                self._release_memory_of(model)
                continue
            atoms += sum(model.batch_cost(p).atoms for p in structures)
            bad = sorted({field for p in predictions for field in non_finite_fields(p)})
            if bad:
                logger.warning(
                    "warm-up of model %r (%s) gave NaN/inf in %s", name, label, ", ".join(bad)
                )
        compile_warmup(name, model, info, self._settings.compile_warmup_batches())
        logger.info(
            "model %r warmed up in %.3f s (%d atoms in all) on %s",
            name,
            time.monotonic() - start,
            atoms,
            self.device or "its device",
        )

    # -- serving -------------------------------------------------------------------------------
    def _serve(self) -> None:
        settings = self._settings
        wait_s = settings.batch_wait_ms / 1000.0
        trim = GrowthTrim()
        while True:
            batch = self._queue.take_batch(
                settings.max_batch_atoms, settings.max_batch_pairs, wait_s, self._has_tasks
            )
            if batch is None:
                return
            self._run_tasks()
            if not batch:
                continue
            trim.start()
            alive = self._serve_batch(batch)
            # the batch's items (neighbour lists, scratch) are gone once it returned
            del batch
            trim.end()
            if not alive:
                return

    def _serve_batch(self, batch: list[WorkItem]) -> bool:
        """Compute one batch; False when the device died."""
        self._stats.leave_queue(len(batch))
        # Callers that cancelled while waiting cost no compute.
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if len(live) < len(batch):
            self._stats.error("cancelled", len(batch) - len(live))
        if not live:
            return True
        start = time.monotonic()
        self._stats.batch_started(
            len(live), sum(i.n_atoms for i in live), [start - i.submitted for i in live]
        )
        try:
            self._run_batch(live)
        except _DeviceDead as dead:
            self._die(str(dead), live)
            return False
        except Exception as exc:  # a bug here must cost one batch, not the worker
            logger.exception("engine worker failed on a batch")
            for item in live:
                reject(item, EvaluationError(f"internal error: {exc}"), self._stats)
        finally:
            self._stats.batch_finished(time.monotonic() - start)
        return True

    def _die(self, reason: str, batch: list[WorkItem]) -> None:
        """The device is gone: fail this batch, tell the engine, end the thread."""
        self.fatal = reason
        logger.critical("device %s failed, this worker stops: %s", self.device or "?", reason)
        error = DeviceFailed(
            f"the device ({self.device or 'model device'}) failed and the server is "
            f"restarting: {reason}"
        )
        for item in batch:
            if not item.future.done():
                reject(item, error, self._stats)
        if self._on_fatal is not None:
            self._on_fatal(self, reason)

    def _run_batch(self, items: list[WorkItem]) -> None:
        name = items[0].model
        key = items[0].model_key
        model = self._versions[key]
        # One pass computes what any structure of the batch asked for; each caller
        # then gets its own outputs (see _deliver).
        outputs = Outputs.combined(item.outputs for item in items)
        if self._capture is not None:
            # what the capture threshold reads; each caller still gets what it asked
            outputs = outputs | self._capture.outputs
        parts = [items]
        while parts:
            part = parts.pop()
            predictions, failure, oom = self._call(model, part, outputs)
            if predictions is not None:
                self._deliver(name, part, predictions, self._shas.get(key))
                continue
            if oom:
                self._release_memory_of(model)
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
                    f"{item.cost.atoms} atoms / {item.cost.pairs} pairs do not fit in memory "
                    f"even alone ({_first_line(failure)})",
                    index=item.index,
                )
            else:
                error = EvaluationError(f"model {name!r} failed: {failure}", index=item.index)
            logger.warning("request failed: %s", error)
            reject(item, error, self._stats)

    def _call(
        self, model: ServedModel, part: list[WorkItem], outputs: Outputs
    ) -> tuple[list[Prediction] | None, str, bool]:
        """One forward pass: (predictions, "", False) or (None, failure message, is_oom).

        Raises _DeviceDead for a fatal device error: no retry can help then.
        """
        self._stats.model_call(self.label)
        try:
            predictions = model.predict([item.prepared for item in part], outputs)
            synchronize(self.device)
        except Exception as exc:
            # Only the message leaves this block: the traceback would keep the
            # failed pass's tensors alive while the halves are retried.
            oom = is_out_of_memory(exc)
            if is_fatal_device_error(exc):
                raise _DeviceDead(f"{type(exc).__name__}: {_first_line(str(exc))}") from None
            if not oom:
                logger.debug("model call on %d structures failed", len(part), exc_info=True)
            return None, f"{type(exc).__name__}: {exc}", oom
        if len(predictions) != len(part):
            message = f"model returned {len(predictions)} predictions for {len(part)} structures"
            return None, message, False
        return predictions, "", False

    def _deliver(
        self, name: str, part: list[WorkItem], predictions: list[Prediction], sha: str | None
    ) -> None:
        for item, prediction in zip(part, predictions, strict=True):
            bad = non_finite_fields(prediction)
            if bad:
                message = f"model {name!r} returned NaN or infinity in {', '.join(bad)}"
                logger.warning("%s (%d atoms)", message, item.n_atoms)
                reject(item, NonFiniteResult(message, index=item.index), self._stats)
                continue
            if self._capture is not None:
                self._offer(name, item, prediction)
            prediction.keep_only(item.outputs)
            prediction.cost = item.cost
            prediction.extras.setdefault("model", name)
            if sha is not None:
                prediction.extras["model_sha"] = sha
            resolve(item, prediction)

    def _offer(self, name: str, item: WorkItem, prediction: Prediction) -> None:
        """The threshold test of capture (the writing happens on its own thread)."""
        assert self._capture is not None
        try:
            self._capture.consider(name, item.structure, prediction, item.origin, item.index)
        except Exception:  # capture must never cost a caller its result
            logger.exception("capture failed on a structure")

    @staticmethod
    def _release_memory_of(model: ServedModel) -> None:
        if str(model.device).startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
