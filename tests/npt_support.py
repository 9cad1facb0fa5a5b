"""Constant-pressure MD of liquid water with the real i-PI driven by ``cace-server serve``.

i-PI integrates NPT (isotropic barostat, Langevin thermostats) and records its
conserved quantity each step; :func:`run_npt` starts i-PI and our server on a UNIX
socket in a temp dir, waits for both to end, and returns what i-PI recorded. Jumps of
the conserved quantity are what a k-set that changes with the cell produces.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ase
import numpy as np

from tests.ipi_support import IpiRun

CLI = [sys.executable, "-m", "cace_server.cli"]

NPT_MOTION = """
      <motion mode="dynamics">
        <dynamics mode="npt">
          <timestep units="femtosecond"> {timestep} </timestep>
          <thermostat mode="langevin"><tau units="femtosecond"> 100 </tau></thermostat>
          <barostat mode="isotropic">
            <tau units="femtosecond"> 100 </tau>
            <thermostat mode="langevin"><tau units="femtosecond"> 100 </tau></thermostat>
          </barostat>
        </dynamics>
      </motion>"""

NPT_OUTPUTS = """
    <properties stride="1" filename="out" flush="1">
      [ step, conserved{electronvolt}, potential{electronvolt}, volume{angstrom3},
        temperature{kelvin}, pressure_md{megapascal} ]
    </properties>
"""


@dataclass
class NptResult:
    mode: str
    conserved: np.ndarray  # eV, one per step (step 0 included)
    potential: np.ndarray  # eV
    volume: np.ndarray  # Å^3
    k_set_changes: int  # steps at which the parity k-set of the cubic cell changed

    @property
    def steps(self) -> int:
        return len(self.conserved) - 1

    @property
    def drift(self) -> float:
        """Last minus first conserved value, eV."""
        return float(self.conserved[-1] - self.conserved[0])

    @property
    def largest_step(self) -> float:
        """Largest |change| of the conserved quantity from one step to the next, eV."""
        return float(np.abs(np.diff(self.conserved)).max())

    @property
    def typical_step(self) -> float:
        """Median |change| from one step to the next, eV."""
        return float(np.median(np.abs(np.diff(self.conserved))))


def relaxed_water(atoms: ase.Atoms, model_file: Path, fmax: float = 0.2) -> ase.Atoms:
    """``atoms`` with positions relaxed (cell fixed) by FIRE on the model.

    liquid-64's O-H bonds are all 1.00 Å, far from this model's minimum (forces up to
    8 eV/Å): MD from there heats by hundreds of kelvin in femtoseconds, and the
    integrator's step-to-step error would hide everything else.
    """
    from ase.optimize import FIRE

    from cace_server.calculator import CACECalculator

    out = atoms.copy()
    out.calc = CACECalculator(model_file, dtype="float64")
    FIRE(out, logfile=None).run(fmax=fmax, steps=300)
    out.calc = None
    return out


def parity_k_count(length: float, dl: float = 2.0) -> int:
    """Vectors n != 0 of a cubic cell of side ``length`` with |k| <= 2 pi / dl."""
    limit = (length / dl) ** 2
    m = int(math.floor(math.sqrt(limit)))
    n = np.arange(-m, m + 1)
    sq = n[:, None, None] ** 2 + n[None, :, None] ** 2 + n[None, None, :] ** 2
    return int(((sq > 0) & (sq <= limit)).sum())


def run_npt(
    workdir: Path,
    socket_dir: str,
    atoms: ase.Atoms,
    model_file: Path,
    mode: str,
    *,
    steps: int,
    timestep_fs: float = 0.5,
    pressure_mpa: float = 0.1,
    timeout: float = 1800.0,
) -> NptResult:
    run = IpiRun(
        workdir,
        socket_dir,
        atoms,
        name=f"npt-{mode}",
        nbeads=1,
        steps=steps,
        motion=NPT_MOTION.format(timestep=timestep_fs),
        outputs=NPT_OUTPUTS,
        pressure_mpa=pressure_mpa,
    )
    run.start()
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--no-http",
            "--no-ipi-reconnect",
            "--model",
            f"water={model_file}",
            "--dtype",
            "float64",
            "--long-range-mode",
            mode,
            "--ipi",
            f"unix:{run.socket_path}",
            "--ipi-template",
            str(workdir / "init.extxyz"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")),
    )
    try:
        code = run.wait(timeout)
        if code != 0:
            raise AssertionError(f"i-PI failed ({code}):\n{run.log()}")
        if server.wait(timeout=60) != 0:
            raise AssertionError(f"server failed:\n{(workdir / 'server.log').read_text()[-3000:]}")
    finally:
        run.stop()
        if server.poll() is None:
            server.kill()
            server.wait(10)
        log.close()
    text = (workdir / "server.log").read_text()
    if f"'mode': '{mode}'" not in text:
        raise AssertionError(f"the server did not report long-range mode {mode}:\n{text[-2000:]}")
    props = run.properties()
    volume = props[:, 3]
    counts = [parity_k_count(v ** (1.0 / 3.0)) for v in volume]
    changes = int(np.count_nonzero(np.diff(counts)))
    return NptResult(mode, props[:, 1], props[:, 2], volume, changes)
