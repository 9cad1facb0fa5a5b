"""Every command's --help prints: help texts are plain text, whatever brackets they hold."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cace_server.cli import app

COMMANDS = ["serve", "convert", "resave", "train", "evaluate", "info", "label"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)], ids=["app", *COMMANDS])
def test_help_prints(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bracketed_defaults_are_shown_verbatim() -> None:
    # "[/tmp/ipi_]" once read as a rich closing tag and crashed `serve --help`.
    result = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "[/tmp/ipi_]" in result.output
