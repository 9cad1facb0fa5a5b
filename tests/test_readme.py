"""Every shell and Python block of README.md runs, section by section.

Blocks run in order in a scratch directory that mirrors the repository (``data``,
``docker`` ... linked; ``clients`` copied, since i-PI writes next to its input),
with this virtual environment's ``bin`` first on PATH.  An HTML comment right
before a block says how to run it:

``<!-- doctest: background ready=URL|ready-file=PATH -->``
    start the block, wait until the URL answers 200 or the file exists; it is
    stopped (SIGTERM to its process group) when the section ends;
``<!-- doctest: wait -->``
    run the block to the end after the background blocks before it; those
    background blocks must then also have exited by themselves (i-PI runs);
``<!-- doctest: requires=PATH -->``
    skip when PATH (the reference checkpoints) is absent, as the parity tests do;
``<!-- doctest: ci -->``
    the command ``.ci/run`` itself runs (checked here: it must appear there);
``<!-- doctest: skip=REASON -->``
    only for what needs a GPU or Docker (checked here);
``<!-- doctest: slow -->``
    its whole section runs in the slow suite (compiling a model takes a minute).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BLOCK = re.compile(
    r"(?:<!--\s*doctest:(?P<directive>[^>]*)-->\s*\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```",
    re.S,
)


@dataclass
class Block:
    lang: str
    code: str
    options: dict[str, str] = field(default_factory=dict)
    line: int = 0


def parse_options(text: str | None) -> dict[str, str]:
    options: dict[str, str] = {}
    text = text or ""
    if "skip=" in text:  # the reason is free text up to the end of the comment
        text, _, reason = text.partition("skip=")
        options["skip"] = reason.strip()
    for word in text.split():
        key, _, value = word.partition("=")
        options[key] = value
    return options


def sections() -> dict[str, list[Block]]:
    text = README.read_text()
    heads = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^## (.+)$", text, re.M)]
    out: dict[str, list[Block]] = {}
    for k, (start, title) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(text)
        blocks = []
        for m in BLOCK.finditer(text, start, end):
            line = text.count("\n", 0, m.start()) + 1
            blocks.append(Block(m["lang"], m["code"], parse_options(m["directive"]), line))
        if blocks:
            out[title] = blocks
    return out


SECTIONS = sections()


def scratch_copy(tmp: Path) -> Path:
    work = tmp / "work"
    work.mkdir()
    for entry in REPO.iterdir():
        if entry.name.startswith(".venv") or entry.name in (".git", "__pycache__"):
            continue
        if entry.name == "clients":
            shutil.copytree(entry, work / entry.name, ignore=shutil.ignore_patterns("*.egg-info"))
        else:
            (work / entry.name).symlink_to(entry)
    # ../shared/reference as the README names it, when this checkout has it.
    shared = REPO.parent / "shared"
    if shared.exists() and not (tmp / "shared").exists():
        (tmp / "shared").symlink_to(shared)
    return work


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VENV"] = sys.prefix  # `make` targets reuse this environment's install
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("CACE_SERVER_TOKEN", None)
    return env


def command(block: Block) -> list[str]:
    if block.lang == "python":
        return [sys.executable, "-c", block.code]
    return ["bash", "-euo", "pipefail", "-c", block.code]


def wait_ready(
    proc: subprocess.Popen[bytes], options: dict[str, str], log: Path, cwd: Path
) -> None:
    deadline = time.monotonic() + float(options.get("timeout", 120))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"background block exited with {proc.returncode}:\n{log.read_text()}"
            )
        if "ready" in options:
            try:
                with urllib.request.urlopen(options["ready"], timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
        elif "ready-file" in options:
            if Path(options["ready-file"]).exists() or (cwd / options["ready-file"]).exists():
                return
        else:
            return
        time.sleep(0.2)
    raise AssertionError(f"background block not ready in time:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(
    "title",
    [
        pytest.param(title, marks=pytest.mark.slow)
        if any("slow" in b.options for b in blocks)
        else title
        for title, blocks in SECTIONS.items()
    ],
)
def test_readme_section(title: str, tmp_path: Path) -> None:
    ci_script = (REPO / ".ci" / "run").read_text()
    work = scratch_copy(tmp_path)
    env = environment()
    background: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        for k, block in enumerate(SECTIONS[title]):
            where = f"README.md:{block.line}"
            if "skip" in block.options:
                reason = block.options["skip"].lower()
                assert "gpu" in reason or "docker" in reason, f"{where}: only GPU/Docker may skip"
                continue
            if "ci" in block.options:
                for line in block.code.strip().splitlines():
                    target = line.split("#")[0].strip()
                    assert target.split()[-1] in ci_script, f"{where}: .ci/run lacks {target}"
                continue
            if "requires" in block.options and not (work / block.options["requires"]).exists():
                pytest.skip(f"{where}: {block.options['requires']} absent")
            log = tmp_path / f"block{k}.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    command(block),
                    cwd=work,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if "background" in block.options:
                background.append((proc, log))
                wait_ready(proc, block.options, log, work)
                continue
            timeout = float(block.options.get("timeout", 300))
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stop(proc)
                raise AssertionError(
                    f"{where}: block ran over {timeout} s:\n{log.read_text()}"
                ) from None
            assert rc == 0, f"{where}: exit {rc}\n{block.code}\n--- output ---\n{log.read_text()}"
            if "wait" in block.options:
                for bg, bg_log in background:
                    try:
                        bg_rc = bg.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        raise AssertionError(f"{where}: background block still running") from None
                    assert bg_rc == 0, f"{where}: background exit {bg_rc}\n{bg_log.read_text()}"
                background.clear()
    finally:
        for proc, _ in background:
            stop(proc)


def test_readme_lists_every_server_setting() -> None:
    """The settings table names every setting, its flag, variable and default."""
    from cace_server.settings import ENV_PREFIX, server_settings

    text = README.read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in text.splitlines()
        if line.startswith("| `--") and line.split("|")[2].strip().startswith(f"`{ENV_PREFIX}")
    }
    table = server_settings()
    for name, (_, setting) in table.items():
        flag = "--" + name.replace("_", "-")
        row = next((r for key, r in rows.items() if key.startswith(f"`{flag}")), None)
        assert row is not None, f"README settings table lacks {flag}"
        assert row[2].strip() == f"`{ENV_PREFIX}{name.upper()}`", f"{flag}: environment variable"
        assert row[3].strip() == setting.shown_default(), f"{flag}: default"
    flags = {key.strip("`").split("/")[0] for key in rows}
    assert flags == {"--" + name.replace("_", "-") for name in table}, (
        "README lists a flag that is no setting"
    )
