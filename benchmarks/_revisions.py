"""Running a benchmark's cases with another revision's code (``--against REV``).

A revision is checked out into a temporary git worktree; each case runs in a fresh
process of the benchmark script that imports cace_server from the tree under test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def use_tree(tree: str) -> None:
    """Import cace_server from ``tree`` (the venv's editable install points elsewhere)."""
    sys.path.insert(0, tree)
    for name in [m for m in sys.modules if m == "cace_server" or m.startswith("cace_server.")]:
        del sys.modules[name]


def child(
    script: str, args: list[str], env: dict[str, str] | None = None
) -> tuple[dict | None, str]:
    """Run ``script args`` in a fresh process (with ``env`` added to this one's
    environment): (its last stdout line as JSON, or the error)."""
    proc = subprocess.run(
        [sys.executable, script, *args],
        capture_output=True,
        text=True,
        cwd="/tmp",
        env=None if env is None else {**os.environ, **env},
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return None, (lines[-1] if lines else f"exit status {proc.returncode}")[:160]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def add_worktree(repo: Path, rev: str, path: str) -> str:
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", "--quiet", path, rev], check=True
    )
    return path


def remove_worktree(repo: Path, path: str) -> None:
    subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", path], check=False)
