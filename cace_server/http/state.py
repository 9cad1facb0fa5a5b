"""What every route shares (a FastAPI dependency): engine, settings, metrics, i-PI groups, jobs.

``create_app`` builds one :class:`HttpState` per app and keeps it on ``app.state``;
a route takes it as a parameter (``state: State``) and reads the request with it:
``parse`` (body to checked objects, off the event loop when large) and ``model``
(the engine's readiness and model-name check, as an error reply).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from cace_server.engine import Engine, EngineError, ModelInfo
from cace_server.http import codec
from cace_server.http.errors import ApiError, from_engine_error, from_validation_error
from cace_server.http.ipi import IpiGroups
from cace_server.http.metrics import HttpMetrics
from cace_server.http.settings import HttpSettings
from cace_server.jobs import JobManager
from cace_server.transcode import ProcessParser

# Bodies above this are parsed and checked on a worker thread, not on the event loop.
_THREAD_BODY_BYTES = 64 * 1024

_Body = TypeVar("_Body", bound=BaseModel)
_Parsed = TypeVar("_Parsed")


class HttpState:
    """The routes' shared state: engine, settings, metrics, i-PI groups, jobs, file digests."""

    def __init__(
        self, engine: Engine, groups: IpiGroups, settings: HttpSettings, jobs: JobManager
    ) -> None:
        self.engine = engine
        self.groups = groups
        self.settings = settings
        self.jobs = jobs
        self.metrics = HttpMetrics(engine, groups.states, jobs.snapshot)
        self.parser = ProcessParser()
        self._digests: dict[tuple[str, str | None], str | None] = {}
        #: where uploaded model files go without a model update directory
        self.upload_dir: str | None = None

    async def close(self) -> None:
        """What the app owns: its jobs, the i-PI groups created through it, the parser process."""
        await asyncio.to_thread(self.jobs.close)
        await self.groups.close()
        self.parser.close()

    def model(self, name: str | None) -> ModelInfo:
        """The model ``name`` means, or 503 while the engine is not ready / 422 if unknown."""
        try:
            return self.engine.serving(name)
        except EngineError as exc:
            raise from_engine_error(exc, batch=False) from None

    async def parse(self, request: Request, build: Callable[[dict[str, Any]], _Parsed]) -> _Parsed:
        """The body (JSON or msgpack) decoded and handed to ``build``, which checks it."""
        body = await request.body()
        ct = request.headers.get("content-type")
        if len(body) >= self.settings.process_body_bytes and codec.is_json(ct):
            # Parsing holds the GIL throughout: in a thread it would stall the event
            # loop (every other client) for seconds; in a process it does not.
            packed, error = await self.parser.json_to_msgpack(body)
            if error is not None:
                raise ApiError(400, "bad_json", f"body is not valid JSON: {error}")
            assert packed is not None
            return await asyncio.to_thread(lambda: build(codec.decode_msgpack(packed)))

        def work() -> _Parsed:
            return build(codec.decode(body, ct, self.settings.allow_binary))

        if len(body) > _THREAD_BODY_BYTES:
            return await asyncio.to_thread(work)
        return work()

    async def digest(self, info: ModelInfo) -> str | None:
        """SHA-256 of the model's file (computed once), None when not from a file."""
        if info.source is None:
            return None
        key = (info.name, info.sha)  # a swapped model is a new version
        if key not in self._digests:
            from cace_server.model.io import file_digest

            try:
                self._digests[key] = await asyncio.to_thread(file_digest, info.source)
            except OSError:
                self._digests[key] = None
        return self._digests[key]


def validated(model: type[_Body], obj: dict[str, Any]) -> _Body:
    """``obj`` read as the request body ``model``, or a 422 naming the first bad field."""
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def http_state(request: Request) -> HttpState:
    state = request.app.state.api
    assert isinstance(state, HttpState)
    return state


#: A route parameter that receives its app's :class:`HttpState`.
State = Annotated[HttpState, Depends(http_state)]
