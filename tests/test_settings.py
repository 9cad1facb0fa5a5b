"""Server settings reach the engine: TOML file, CACE_SERVER_* variables and flags."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cace_server.engine import EngineSettings
from cace_server.server import engine_settings
from cace_server.settings import ServerSettings, load_settings

CLI = [sys.executable, "-m", "cace_server.cli"]
ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineSettings)}
SHARED = [f for f in dataclasses.fields(ServerSettings) if f.name in ENGINE_FIELDS]


def test_neighbour_list_and_step_settings_come_from_every_layer(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text("neighbor_skin = 0.3\n")
    settings = load_settings(
        toml,
        environ={"CACE_SERVER_STEP_WAIT_MS": "250", "CACE_SERVER_MAX_NEIGHBOR_LISTS": "7"},
        overrides={"max_neighbor_lists": 12},  # a flag wins over the variable
    )
    engine = engine_settings(settings, ["water"])
    assert (engine.neighbor_skin, engine.step_wait_ms, engine.max_neighbor_lists) == (0.3, 250, 12)


def non_default(field: dataclasses.Field[object]) -> object:
    """A valid value of the field other than its server default."""
    value = field.default
    if field.name == "device":
        return "cuda:1"  # not opened by EngineSettings itself
    if field.name == "dtype":
        return "float32"
    if value is None:  # torch_threads
        return 3
    assert isinstance(value, (int, float)) and not isinstance(value, bool), field.name
    return value + (1 if isinstance(value, int) else 0.25)


def test_every_engine_setting_of_the_server_is_passed_on() -> None:
    assert {f.name for f in SHARED} >= {"neighbor_skin", "step_wait_ms", "max_neighbor_lists"}
    given = {f.name: non_default(f) for f in SHARED}
    engine = engine_settings(dataclasses.replace(ServerSettings(), **given), [])
    assert {name: getattr(engine, name) for name in given} == given


def test_server_defaults_are_the_engine_defaults() -> None:
    server, engine = ServerSettings(), EngineSettings()
    # device/dtype None (the engine's) keep an already-built model; the server loads files.
    differ = {"device", "dtype"}
    assert {f.name: getattr(server, f.name) for f in SHARED if f.name not in differ} == {
        f.name: getattr(engine, f.name) for f in SHARED if f.name not in differ
    }


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("neighbor_skin", -0.1, "neighbor_skin must not be negative"),
        ("step_wait_ms", 0.0, "step_wait_ms must be positive"),
        ("max_neighbor_lists", 0, "max_neighbor_lists must be at least 1"),
    ],
)
def test_engine_settings_bounds(name: str, value: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EngineSettings(**{name: value})


def test_serve_flags_reach_the_engine_settings() -> None:
    """Each flag's bad value is refused by the engine's check: the flag got there."""
    cases = {
        "--neighbor-skin=-0.1": "neighbor_skin must not be negative",
        "--step-wait-ms=0": "step_wait_ms must be positive",
        "--max-neighbor-lists=0": "max_neighbor_lists must be at least 1",
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {
        flag: subprocess.Popen(
            [*CLI, "serve", "--no-http", flag],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for flag in cases
    }
    try:
        for flag, proc in procs.items():
            output, _ = proc.communicate(timeout=120)
            assert proc.returncode == 2, f"{flag}: exit {proc.returncode}\n{output}"
            assert cases[flag] in output, f"{flag}:\n{output}"
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
