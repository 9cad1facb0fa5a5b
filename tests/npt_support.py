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

    def largest_step_after(self, settle: int) -> float:
        """Largest |change| from one step to the next after the first ``settle`` steps."""
        return float(np.abs(np.diff(self.conserved))[settle:].max())

    def spikes(self, window: int = 25) -> np.ndarray:
        """|change| of each step over the median |change| of the steps around it.

        The integrator's own error oscillates smoothly with the bond vibrations (a
        period of ~18 steps of 0.25 fs), so its changes stay near their local median;
        a jump of the potential (a k-vector entering the sum) is one step far above it.
        """
        d = np.abs(np.diff(self.conserved))
        local = np.array([np.median(d[max(0, i - window) : i + window + 1]) for i in range(len(d))])
        return np.asarray(d / np.maximum(local, 1e-12))


def near_crossing(atoms: ase.Atoms, margin: float) -> ase.Atoms:
    """``atoms`` (cubic) scaled to a side ``margin`` (relative) off 2 sqrt(38) Å, where
    the original's k-set (dl = 2 Å) gains or loses the 36 vectors with |n|^2 = 38."""
    side = float(atoms.cell[0, 0])
    target = 2.0 * math.sqrt(38.0) * (1.0 + margin)
    out = atoms.copy()
    out.set_cell(atoms.cell * (target / side), scale_atoms=True)
    return out


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
    m = math.floor(math.sqrt(limit))
    n = np.arange(-m, m + 1)
    sq = n[:, None, None] ** 2 + n[None, :, None] ** 2 + n[None, None, :] ** 2
    return int(((sq > 0) & (sq <= limit)).sum())


class NptRun:
    """i-PI (NPT) and ``cace-server serve`` in one long-range mode, as two processes."""

    def __init__(
        self,
        workdir: Path,
        socket_dir: str,
        atoms: ase.Atoms,
        model_file: Path,
        mode: str,
        *,
        steps: int,
        timestep_fs: float = 0.25,
        pressure_mpa: float = 0.1,
        threads: int = 1,
    ) -> None:
        self.mode = mode
        self.workdir = workdir
        self.ipi = IpiRun(
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
        self.command = [
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
            "--torch-threads",
            str(threads),
            "--ipi",
            f"unix:{self.ipi.socket_path}",
            "--ipi-template",
            str(workdir / "init.extxyz"),
        ]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.server: subprocess.Popen[bytes] | None = None

    def start(self) -> NptRun:
        self.ipi.start()
        with open(self.workdir / "server.log", "wb") as log:
            self.server = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        return self

    def stop(self) -> None:
        self.ipi.stop()
        if self.server is not None and self.server.poll() is None:
            self.server.kill()
            self.server.wait(10)

    def result(self, timeout: float) -> NptResult:
        """Wait for both to end (the server exits with i-PI) and read i-PI's record."""
        assert self.server is not None
        try:
            code = self.ipi.wait(timeout)
            if code != 0:
                raise AssertionError(f"i-PI failed ({code}):\n{self.ipi.log()}")
            if self.server.wait(timeout=60) != 0:
                raise AssertionError(f"server failed:\n{self.server_log()[-3000:]}")
        finally:
            self.stop()
        text = self.server_log()
        if f"'mode': '{self.mode}'" not in text:
            raise AssertionError(f"the server did not report mode {self.mode}:\n{text[-2000:]}")
        props = self.ipi.properties()
        volume = props[:, 3]
        counts = [parity_k_count(v ** (1.0 / 3.0)) for v in volume]
        changes = int(np.count_nonzero(np.diff(counts)))
        return NptResult(self.mode, props[:, 1], props[:, 2], volume, changes)

    def server_log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")
