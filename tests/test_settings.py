"""One settings tree: each value one field of one section, with one default, and the
TOML file, CACE_SERVER_* variables and flags generated from the fields."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from cace_server.cli import app
from cace_server.engine import Engine, EngineSettings
from cace_server.options import Setting, options_of
from cace_server.server import build_engine
from cace_server.settings import (
    ENV_PREFIX,
    ServerSettings,
    load_settings,
    sections,
    server_settings,
)

CLI = [sys.executable, "-m", "cace_server.cli"]
TABLE = server_settings()


def serve_command() -> Any:
    """The click command typer builds (typer vendors its own click)."""
    return typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]


def test_server_settings_are_the_sections_and_nothing_else() -> None:
    for f in dataclasses.fields(ServerSettings):
        assert dataclasses.is_dataclass(f.default_factory), f"{f.name} is no section"
    assert options_of(ServerSettings) == []
    assert set(sections()) == {"model", "engine", "http", "ipi", "capture", "jobs", "log"}


def test_no_two_sections_declare_the_same_field() -> None:
    seen: dict[str, str] = {}
    for section, cls in sections().items():
        for f in dataclasses.fields(cls):
            assert f.name not in seen, f"{f.name} in both {seen[f.name]} and {section}"
            seen[f.name] = section


def test_every_setting_name_is_one_field_of_one_section() -> None:
    owners: dict[str, list[str]] = {}
    for section, cls in sections().items():
        for setting in options_of(cls):
            owners.setdefault(setting.name, []).append(f"{section}.{setting.field.name}")
    assert {name: len(where) for name, where in owners.items() if len(where) != 1} == {}
    assert set(owners) == set(TABLE)
    for name, (section, setting) in TABLE.items():
        assert setting.option.help, f"{name} has no help text"
        assert getattr(ServerSettings(), section).__dataclass_fields__[setting.field.name]


def test_serve_options_are_generated_from_the_fields() -> None:
    """Every setting has its flag; the help shows the field's default, the option
    itself defaults to "not given" (the TOML file and the environment then apply)."""
    options = {p.name: p for p in serve_command().params}
    assert set(options) == {*TABLE, "config"}
    for name, (_, setting) in TABLE.items():
        option = options[name]
        assert option.default is None, name
        assert option.help is not None and option.help.endswith(f"[{setting.shown_default()}]")
        assert f"--{name.replace('_', '-')}" in option.opts, option.opts


def test_serve_help_shows_the_defaults() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=1000)
    assert result.exit_code == 0, result.output
    for name in ("port", "max_request_bytes", "max_atoms", "request_timeout_s"):
        assert f"[{TABLE[name][1].shown_default()}]" in result.output, name


# -- one value through every layer --------------------------------------------------------

# Valid values other than the defaults, as a user writes them.
SPECIAL: dict[str, Any] = {
    "model": ["a.safetensors", "b=c/d.safetensors"],
    "default_model": "b",
    "device": "cuda:1",  # not opened by the settings themselves
    "dtype": "float32",
    "long_range_mode": ["smooth", "b=parity"],
    "long_range_method": ["mesh"],
    "compile": ["on", "b=reduce-overhead"],
    "compile_warmup": ["init.xyz:8", "other.xyz"],
    "compile_cache_dir": "/var/cache/cace",
    "host": "0.0.0.0",
    "token": "s3cret",
    "allowed_hosts": ["cace-server", "[fd00::7]"],
    "ipi": ["unix:one", "localhost:31415"],
    "ipi_template": ["one.xyz", "two.xyz"],
    "ipi_model": "b",
    "ipi_attach_socket_prefix": "/run/ipi/",
    "ipi_attach_hosts": ["ipi.example"],
    "ipi_attach_ports": ["4000-4010", "5000"],
    "log_level": "debug",
    "capture": "/data/capture",  # not created by the settings themselves
    "capture_threshold": 0.002,
    "capture_force_threshold": 0.5,
    "model_update_dir": "/srv/models",
    "model_signing_key_file": "/etc/cace/model.key",  # read by the engine, not here
    "job_batch_atoms": 2048,
}


def other_value(name: str, setting: Setting) -> Any:
    if name in SPECIAL:
        return SPECIAL[name]
    default = setting.default
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 1
    assert isinstance(default, float), name
    return default + 0.25


VALUES = {name: other_value(name, setting) for name, (_, setting) in TABLE.items()}


def env_text(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def flag_args(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        return [arg for item in value for arg in (flag, item)]
    return [flag, str(value)]


def from_flags(args: list[str]) -> ServerSettings:
    """What `serve` loads from these flags (its parser, then the loader)."""
    context = serve_command().make_context("serve", args)
    given = {k: v for k, v in context.params.items() if k != "config" and v not in (None, [], ())}
    return load_settings(context.params["config"], environ={}, overrides=given)


def test_toml_environment_and_flags_give_the_same_value_for_every_field(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in VALUES.items()))
    from_toml = load_settings(toml, environ={})
    environ = {ENV_PREFIX + name.upper(): env_text(value) for name, value in VALUES.items()}
    from_env = load_settings(environ=environ)
    flagged = from_flags([arg for name, value in VALUES.items() for arg in flag_args(name, value)])
    assert from_toml == from_env == flagged
    defaults = ServerSettings()
    for name, (section, setting) in TABLE.items():
        value = getattr(getattr(from_toml, section), setting.field.name)
        assert value != getattr(getattr(defaults, section), setting.field.name), name


def test_layers_override_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "server.toml"
    toml.write_text("neighbor_skin = 0.3\nmax_atoms = 10\n")
    settings = load_settings(
        toml,
        environ={"CACE_SERVER_STEP_WAIT_MS": "250", "CACE_SERVER_MAX_NEIGHBOR_LISTS": "7"},
        overrides={"max_neighbor_lists": 12},  # a flag wins over the variable
    )
    engine = settings.engine
    assert (engine.neighbor_skin, engine.step_wait_ms, engine.max_neighbor_lists) == (0.3, 250, 12)
    assert settings.http.max_atoms == 10
    # an empty optional variable is the default, and so is 0 threads
    assert load_settings(environ={"CACE_SERVER_TOKEN": ""}).http.token is None
    threads = TABLE["torch_threads"][1].default
    assert load_settings(environ={"CACE_SERVER_TORCH_THREADS": ""}).engine.torch_threads == threads
    assert load_settings(environ={}, overrides={"torch_threads": 0}).engine.torch_threads == threads
    with pytest.raises(ValueError, match="unknown settings"):
        (tmp_path / "bad.toml").write_text("max_atom = 1\n")
        load_settings(tmp_path / "bad.toml", environ={})
    with pytest.raises(ValueError, match="CACE_SERVER_HTTP: not a boolean"):
        load_settings(environ={"CACE_SERVER_HTTP": "maybe"})


def test_the_server_passes_its_sections_on() -> None:
    settings = load_settings(environ={}, overrides={"max_batch_atoms": 77, "torch_threads": 1})
    engine = build_engine(settings)
    assert engine.settings is settings.engine


def test_python_api_defaults_are_the_servers() -> None:
    """EngineSettings() is what `cace-server serve` runs with; an Engine without
    settings keeps a built model where and as it is."""
    assert EngineSettings() == ServerSettings().engine
    assert (EngineSettings().device, EngineSettings().dtype) == ("cpu", "float64")
    assert EngineSettings().torch_threads == TABLE["torch_threads"][1].default
    from cace_server.model import random_model

    kept = Engine(random_model(seed=1)).settings
    assert (kept.device, kept.dtype, kept.torch_threads) == (None, None, None)


def test_cross_checks() -> None:
    with pytest.raises(ValueError, match="--ipi needs --ipi-template"):
        load_settings(environ={}, overrides={"ipi": ["unix:a"]})
    with pytest.raises(ValueError, match="one --ipi-template for all"):
        load_settings(environ={}, overrides={"ipi": ["unix:a"], "ipi_template": ["a.xyz", "b.xyz"]})
    with pytest.raises(ValueError, match=r"port must be in 1\.\.65535"):
        load_settings(environ={}, overrides={"port": 0})
    with pytest.raises(ValueError, match="not a port or a port range"):
        load_settings(environ={}, overrides={"ipi_attach_ports": ["x"]})


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
