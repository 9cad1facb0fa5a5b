"""The ``cace-server`` command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    name="cace-server",
    help="Serve CACE machine-learned interatomic potentials to i-PI and ASE.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def convert(
    source: Path = typer.Argument(
        ..., help="checkpoint written by torch.save(model) of the original CACE package"
    ),
    target: Path = typer.Argument(..., help="native model file to write (.safetensors)"),
    dtype: str = typer.Option("float64", help="dtype to store the weights in: float32 or float64"),
) -> None:
    """Convert an original CACE checkpoint to the native safetensors format.

    The checkpoint is read without the original package and without running any
    code from the pickle: anything off the allow-list is refused.
    """
    from cace_server.model import convert_original, save_model
    from cace_server.model.checkpoint import UnsafeCheckpointError, UnsupportedCheckpointError

    try:
        model = convert_original(source, dtype=dtype)
    except (UnsafeCheckpointError, UnsupportedCheckpointError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    save_model(model, target, {"converted_from": source.name})
    typer.echo(
        f"wrote {target} ({model.n_parameters:,} parameters, elements {list(model.elements)})"
    )


@app.command()
def info(
    model: Path = typer.Argument(..., help="native model file"),
    as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON"),
) -> None:
    """Show what a model file contains."""
    from cace_server.model import ModelFileError, load_model
    from cace_server.model.io import file_digest, read_metadata

    try:
        meta = read_metadata(model)
        loaded = load_model(model)
    except ModelFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    cfg = meta["config"]
    summary = {
        "file": str(model),
        "sha256": file_digest(model),
        "format_version": int(meta["format_version"]),
        "elements": cfg["elements"],
        "cutoff": cfg["cutoff"],
        "dtype": cfg["dtype"],
        "parameters": loaded.n_parameters,
        "max_l": cfg["max_l"],
        "max_nu": cfg["max_nu"],
        "message_passing_layers": cfg["num_message_passing"],
        "long_range": cfg["ewald"] is not None,
        "readouts": [r["name"] for r in cfg["readouts"]],
        "extra": meta["extra"],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        typer.echo(f"{key:>24}: {value}")


@app.command()
def serve(
    model: list[str] = typer.Option(
        None,
        "--model",
        "-m",
        help="model file, or NAME=FILE; repeat to serve several (default: the bundled water model)",
    ),
    default_model: str = typer.Option(None, help="name of the default model"),
    device: str = typer.Option(None, help="cpu, cuda or cuda:N [cpu]"),
    dtype: str = typer.Option(None, help="float32 or float64 [float64]"),
    http: bool = typer.Option(None, "--http/--no-http", help="serve the HTTP API [yes]"),
    host: str = typer.Option(None, help="HTTP bind address [127.0.0.1]"),
    port: int = typer.Option(None, help="HTTP port [8000]"),
    token: str = typer.Option(
        None, help="bearer token required by HTTP routes (prefer CACE_SERVER_TOKEN)"
    ),
    max_request_bytes: int = typer.Option(None, help="largest HTTP request body [256 MiB]"),
    max_atoms: int = typer.Option(None, help="most atoms in one structure [200000]"),
    max_structures: int = typer.Option(None, help="most structures in one batch request [4096]"),
    request_timeout_s: float = typer.Option(None, help="HTTP request timeout in seconds [600]"),
    min_distance: float = typer.Option(
        None, help="refuse structures with atoms closer than this (A) [0.1]"
    ),
    ipi: list[str] = typer.Option(
        None, "--ipi", help="i-PI address to drive: unix:NAME or HOST:PORT; repeatable"
    ),
    ipi_clients: int = typer.Option(None, help="connections per i-PI address (one per bead) [1]"),
    ipi_template: list[str] = typer.Option(
        None,
        "--ipi-template",
        help="structure file giving the species of the i-PI system (one, or one per --ipi)",
    ),
    ipi_reconnect: bool = typer.Option(
        None, "--ipi-reconnect/--no-ipi-reconnect", help="reconnect when i-PI goes away [yes]"
    ),
    ipi_model: str = typer.Option(None, help="model for i-PI connections [default model]"),
    max_batch_atoms: int = typer.Option(None, help="most atoms in one engine batch [8192]"),
    max_batch_pairs: int = typer.Option(
        None, help="most neighbour pairs in one engine batch [600000]"
    ),
    batch_wait_ms: float = typer.Option(None, help="wait this long for a batch to fill [2]"),
    max_queue: int = typer.Option(None, help="most structures waiting in the engine [4096]"),
    torch_threads: int = typer.Option(None, help="torch intra-op threads [torch default]"),
    log_level: str = typer.Option(None, help="debug, info, warning, error [info]"),
    log_json: bool = typer.Option(None, "--log-json/--no-log-json", help="JSON-lines logs [no]"),
    config: Path = typer.Option(
        None, "--config", "-c", help="TOML file with any of these settings"
    ),
) -> None:
    """Serve models over HTTP and/or as an i-PI driver until SIGINT/SIGTERM.

    Settings come from, in increasing priority: defaults, the --config TOML file,
    CACE_SERVER_<NAME> environment variables, and these flags.
    """
    import asyncio

    from cace_server.server import serve as run
    from cace_server.server import setup_logging
    from cace_server.settings import load_settings

    flags = {
        k: v
        for k, v in locals().items()
        if k not in ("config", "asyncio", "run", "setup_logging", "load_settings")
        and v not in (None, [])
    }
    try:
        settings = load_settings(config, overrides=flags)
    except (ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    setup_logging(settings.log_level, settings.log_json)
    from cace_server.engine import EngineError

    try:
        asyncio.run(run(settings))
    except (ValueError, EngineError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def main() -> None:
    app(prog_name="cace-server")


if __name__ == "__main__":
    main()
