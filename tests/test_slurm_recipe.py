"""deploy/slurm/run_pimd.sbatch cannot run here (no Slurm): it is checked instead.

It must parse (``bash -n``), and every ``cace-server serve`` flag it passes must be one
the command has, so that a renamed setting cannot leave the recipe broken.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ase.io
import pytest
import typer.main

from cace_server.cli import app
from tests.ipi_support import IPI_SCRIPT, IpiRun
from tests.test_serve_http import free_port

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "deploy" / "slurm" / "run_pimd.sbatch"


def serve_flags() -> set[str]:
    """Every spelling of every option of ``cace-server serve``."""
    group = typer.main.get_command(app)
    serve = group.commands["serve"]  # type: ignore[attr-defined]
    return {flag for p in serve.params for flag in (*p.opts, *p.secondary_opts)}


def recipe_serve_flags() -> set[str]:
    """The flags of the ``SERVE=(cace-server serve ...)`` array and what is added to it."""
    text = SBATCH.read_text()
    command = re.search(r"SERVE=\(cace-server serve(.*?)\)\n", text, re.S)
    assert command is not None, "no SERVE=(cace-server serve ...) in the recipe"
    added = re.findall(r"SERVE\+=\(([^)]*)\)", text)
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", " ".join([command.group(1), *added])))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_sbatch_script_parses() -> None:
    result = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_serve_flag_of_the_recipe_exists() -> None:
    used = recipe_serve_flags()
    # what the recipe is about: no HTTP, TCP i-PI, K connections, exit with i-PI's run
    assert {"--no-http", "--ipi", "--ipi-clients", "--no-ipi-reconnect"} <= used, used
    assert used - serve_flags() == set()


def test_the_readme_names_the_script_and_its_variables() -> None:
    readme = (SBATCH.parent / "README.md").read_text()
    script = SBATCH.read_text()
    variables = set(re.findall(r"^([A-Z_]+)=\$\{\1:-", script, re.M))
    assert variables, "no VAR=${VAR:-default} settings in the recipe"
    assert {v for v in variables if f"`{v}`" not in readme} == set()
    assert "run_pimd.sbatch" in readme


STUB_SRUN = """#!/bin/bash
# srun on one machine: drop the options, run the command once per --ntasks
ntasks=1 output=""
while [[ "$1" == -* ]]; do
    case "$1" in
        --ntasks=*) ntasks="${1#--ntasks=}" ;;
        --output=*) output="${1#--output=}" ;;
    esac
    shift
done
pids=()
for i in $(seq "$ntasks"); do
    if [[ -n "$output" ]]; then
        "$@" >"${output//%N/node$i}" 2>&1 &
    else
        "$@" &
    fi
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


@pytest.mark.ipi
@pytest.mark.skipif(not IPI_SCRIPT.exists(), reason="the i-pi program is not installed")
def test_the_recipe_runs_with_a_stub_srun(tmp_path: Path) -> None:
    """The whole script on this machine: srun and scontrol stubbed, two "nodes" on
    loopback, i-PI with 4 beads: both servers get 2 connections and exit with i-PI."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(STUB_SRUN)
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho localhost\n")
    for stub in ("srun", "scontrol"):
        (bin_dir / stub).chmod(0o755)
    atoms = ase.io.read(ROOT / "clients" / "ipi" / "init.extxyz")[:24]
    # an inet input.xml; the script puts in its own address and port
    run = IpiRun(tmp_path, "/tmp", atoms, nbeads=4, steps=2, port=1, velocities=False)
    ase.io.write(tmp_path / "init.extxyz", atoms)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_ID": "7",
        "SLURM_CPUS_PER_TASK": "1",
        "IPI_HOST": "127.0.0.1",
        "IPI_PORT": str(free_port()),
        "DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", str(SBATCH)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.log")))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert "4 beads), 2 servers of 2 connections" in result.stdout, result.stdout
    assert "i-PI exited 0, the servers 0" in result.stdout, result.stdout
    assert len(run.properties()) == 3
    for node in ("node1", "node2"):
        assert "connected to 127.0.0.1" in (tmp_path / f"server-{node}.log").read_text()
