"""Compiled model calls in the engine: switching them on, and compiling before ready.

The model side is :mod:`cace_server.model.compiled`. Here the engine decides when
compiling happens: shapes named by the ``compile_warmup`` setting (an i-PI run's
structure and bead count) compile during warm-up, before ``/readyz`` turns ready;
any other shape met while serving is served eagerly while it compiles on a thread of
its own, so no request waits for the compiler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Sequence

from cace_server.engine.models import ModelInfo, ServedModel
from cace_server.outputs import Outputs
from cace_server.structures import Structure

logger = logging.getLogger(__name__)


def enable_compiled(name: str, model: ServedModel, mode: str, cache_dir: str | None) -> int:
    """Give ``model`` compiled calls in ``mode`` (background compiles); how many."""
    from cace_server.model.compiled import compile_model

    if cache_dir:
        # Inductor reads its cache directory from the environment at each lookup.
        os.makedirs(cache_dir, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    import torch

    if not isinstance(model, torch.nn.Module):
        logger.warning("model %r cannot be compiled (not a torch module); served eagerly", name)
        return 0
    calls = compile_model(model, mode, background=True)
    if not calls:
        logger.warning("model %r has no CACE potential to compile; served eagerly", name)
    return len(calls)


@contextlib.contextmanager
def eager(model: ServedModel) -> Iterator[None]:
    """Every call of ``model`` eager meanwhile (the generic warm-up's shapes are not
    what traffic brings; compiling each would cost start-up minutes)."""
    from cace_server.model.compiled import compiled_calls

    calls = compiled_calls(model)
    for call in calls:
        call.enabled = False
    try:
        yield
    finally:
        for call in calls:
            call.enabled = True


def compile_warmup(
    name: str, model: ServedModel, info: ModelInfo, entries: Sequence[tuple[str, int]]
) -> None:
    """Compile the shapes of ``entries`` ((structure file, copies per batch)) now, on
    the calling thread, through the model's own ``predict`` (so its grouping of
    structures into calls is the one traffic will meet)."""
    from cace_server.model.compiled import compiled_calls

    calls = compiled_calls(model)
    if not calls or not entries:
        return
    for call in calls:
        call.background = False
    try:
        for path, copies in entries:
            structure = _read(path)
            unknown = sorted(set(structure.numbers.tolist()) - set(info.elements))
            if unknown:
                logger.info(
                    "compile warm-up of model %r: %s skipped (elements %s not in the model)",
                    name,
                    path,
                    unknown,
                )
                continue
            start = time.monotonic()
            prepared = model.prepare(structure)
            # what i-PI and a plain HTTP request ask: the model's default outputs
            model.predict([prepared] * copies, Outputs.default_for(info.outputs))
            logger.info(
                "compile warm-up of model %r: %s x %d ready in %.1f s",
                name,
                path,
                copies,
                time.monotonic() - start,
            )
    finally:
        for call in calls:
            call.background = True


def _read(path: str) -> Structure:
    import ase.io

    try:
        atoms = ase.io.read(path)
    except Exception as exc:
        raise ValueError(f"compile_warmup: cannot read {path!r}: {exc}") from exc
    if isinstance(atoms, list):
        atoms = atoms[0]
    return Structure.from_ase(atoms)
