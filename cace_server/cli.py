"""The ``cace-server`` command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(
    name="cace-server",
    help="Serve CACE machine-learned interatomic potentials to i-PI and ASE.",
    no_args_is_help=True,
    add_completion=False,
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


def main() -> None:
    app(prog_name="cace-server")


if __name__ == "__main__":
    sys.exit(main())
