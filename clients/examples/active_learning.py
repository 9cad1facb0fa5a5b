"""The active-learning loop through one cace-server, with the simulation still running.

One i-PI path-integral run drives a committee served by ``cace-server serve``, which
captures the structures the committee is unsure of. Each round then:

1. run: i-PI advances ``--steps`` steps (it keeps running through all later phases);
2. label: the round's most uncertain captured structures get reference labels
   (``cace-server label``, any ASE calculator; GFN2-xTB through tblite by default,
   what the bundled water data was computed with);
3. fine-tune: every member starts from its current weights, on the training data
   plus everything labelled so far (``cace-server train --init-from --committee``),
   and the new committee is calibrated on the validation data;
4. swap: the new committee replaces the served one between two i-PI steps
   (``PUT /v1/models/NAME``); i-PI never reconnects.

It prints a table per round: the beads captured during the round's steps and the
fraction of the round's beads above the threshold, the structures labelled so far,
the validation energy/force RMSE of the committee mean before and after the
fine-tune, and the wall time of each phase.

    python clients/examples/active_learning.py --workdir /tmp/al --rounds 2

Runs on the machine of the server (it starts ``cace-server`` and ``i-pi`` and reads
their files); needs cace-server, i-PI, and the reference calculator's package.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "cace_server.cli"]
MODEL = "water"
IPI_INPUT = """<simulation verbosity="low" safe_stride="1000">
  <output prefix="al">
    <properties stride="1" filename="out"> [ step, time{{picosecond}}, temperature{{kelvin}},
      potential{{electronvolt}} ] </properties>
  </output>
  <total_steps> {total_steps} </total_steps>
  <prng><seed> {seed} </seed></prng>
  <ffsocket name="cace" mode="unix" pbc="false">
    <address> {address} </address>
    <latency> 1e-4 </latency>
    <timeout> 3600 </timeout>
  </ffsocket>
  <system>
    <initialize nbeads="{beads}">
      <file mode="ase" units="angstrom"> {init} </file>
      <velocities mode="thermal" units="kelvin"> {temperature} </velocities>
    </initialize>
    <forces><force forcefield="cace"/></forces>
    <motion mode="dynamics">
      <dynamics mode="nvt">
        <timestep units="femtosecond"> {timestep} </timestep>
        <thermostat mode="pile_g"><tau units="femtosecond"> 100 </tau></thermostat>
      </dynamics>
    </motion>
    <ensemble><temperature units="kelvin"> {temperature} </temperature></ensemble>
  </system>
</simulation>
"""


@dataclass
class Round:
    index: int
    steps: int = 0
    captured: int = 0
    labelled: int = 0
    above: float = math.nan
    before: tuple[float, float] = (math.nan, math.nan)
    after: tuple[float, float] = (math.nan, math.nan)
    seconds: dict[str, float] = field(default_factory=dict)
    sha: str = ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    data = REPO / "data"
    members = sorted((REPO / "tests" / "data" / "committee").glob("seed*.safetensors"))
    parser.add_argument("--workdir", type=Path, required=True, help="where every file goes")
    parser.add_argument("--members", type=Path, nargs="+", default=members)
    parser.add_argument("--train", type=Path, default=data / "water_gfn2_train.extxyz.gz")
    parser.add_argument("--valid", type=Path, default=data / "water_gfn2_test.extxyz.gz")
    parser.add_argument("--init", type=Path, default=REPO / "clients" / "ipi" / "init.extxyz")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="i-PI steps per round")
    parser.add_argument("--beads", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=300.0)
    parser.add_argument("--timestep", type=float, default=0.5, help="fs")
    parser.add_argument(
        "--threshold", type=float, default=2e-4, help="capture: energy uncertainty, eV/atom"
    )
    parser.add_argument("--label", type=int, default=8, help="structures labelled per round")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs per round")
    parser.add_argument("--calculator", default="tblite.ase:TBLite")
    parser.add_argument(
        "--calculator-args", default=json.dumps({"method": "GFN2-xTB", "verbosity": 0})
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    args = parser.parse_args()
    Loop(args).run()


class Loop:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.work = args.workdir.resolve()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = 0
        self.address = f"/tmp/ipi_cace-al-{os.getpid()}"

    # -- processes -----------------------------------------------------------------------------
    def run(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        committee = self._initial_committee()
        try:
            self._start_ipi()
            self._start_server(committee)
            rounds = [self._round(r, committee) for r in range(1, self.args.rounds + 1)]
        finally:
            self._stop()
        self._print(rounds)

    def _initial_committee(self) -> Path:
        folder = self.work / "round0"
        folder.mkdir(exist_ok=True)
        names = []
        for member in self.args.members:
            shutil.copy(member, folder / member.name)
            names.append(json.dumps(member.name))
        path = folder / f"{MODEL}.toml"
        path.write_text(f"members = [{', '.join(names)}]\nalpha = 1.0\n")
        return path

    def _start_ipi(self) -> None:
        folder = self.work / "ipi"
        folder.mkdir(exist_ok=True)
        shutil.copy(self.args.init, folder / "init.extxyz")
        (folder / "input.xml").write_text(
            IPI_INPUT.format(
                total_steps=10**7,  # stopped by the loop (EXIT file) when it is done
                seed=31415,
                address=Path(self.address).name.removeprefix("ipi_"),
                beads=self.args.beads,
                init="init.extxyz",
                temperature=self.args.temperature,
                timestep=self.args.timestep,
            )
        )
        log = open(folder / "ipi.log", "wb")  # noqa: SIM115 - kept open for the process
        self.procs.append(
            subprocess.Popen([_ipi_script(), "input.xml"], cwd=folder, stdout=log, stderr=log)
        )
        for _ in range(600):
            if Path(self.address).exists():
                return
            time.sleep(0.1)
        raise SystemExit("i-PI did not open its socket (see ipi/ipi.log)")

    def _start_server(self, committee: Path) -> None:
        self.port = _free_port()
        log = open(self.work / "server.log", "wb")  # noqa: SIM115 - kept open for the process
        command = [
            *CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--model", f"{MODEL}={committee}",
            "--ipi", f"unix:{self.address}", "--ipi-clients", str(self.args.beads),
            "--ipi-template", str(self.args.init),
            "--capture", str(self.work / "capture"),
            "--capture-threshold", str(self.args.threshold), "--capture-rate", "1000",
            "--allow-model-updates", "--model-update-dir", str(self.work),
            "--torch-threads", str(self.args.threads),
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS=str(self.args.threads))
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=log, env=env))
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(self._url("/readyz"), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not become ready (see server.log)")

    def _stop(self) -> None:
        (self.work / "ipi" / "EXIT").touch()  # i-PI stops after its current step
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        Path(self.address).unlink(missing_ok=True)

    def _url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # -- one round -----------------------------------------------------------------------------
    def _round(self, index: int, committee: Path) -> Round:
        row = Round(index)
        start = time.monotonic()
        first = self._ipi_step()
        target = first + self.args.steps
        while self._ipi_step() < target:
            self._check_alive()
            time.sleep(0.5)
        last = self._ipi_step()
        row.steps = last - first
        row.seconds["run"] = time.monotonic() - start
        time.sleep(1.0)  # the capture writer writes a record just after its step
        row.captured = self._captured_between(first, last)
        row.above = row.captured / (self.args.beads * row.steps) if row.steps else math.nan

        start = time.monotonic()
        labelled = self.work / "labelled.extxyz"
        selection = self._select(index)
        if selection is not None:
            _run([
                *CLI, "label", str(selection), "-o", str(labelled),
                "--calculator", self.args.calculator,
                "--calculator-args", self.args.calculator_args,
            ])  # fmt: skip
        row.labelled = _frames(labelled)
        row.seconds["label"] = time.monotonic() - start

        start = time.monotonic()
        row.before = _errors(self._served_committee(index - 1), self.args.valid)
        folder = self.work / f"round{index}"
        folder.mkdir(exist_ok=True)
        data = [str(self.args.train)] + ([str(labelled)] if labelled.exists() else [])
        _run([
            *CLI, "train", *data, "--valid", str(self.args.valid),
            "--init-from", str(self._served_committee(index - 1)),
            "--committee", str(len(self.args.members)), "--epochs", str(self.args.epochs),
            "--seed", str(index), "--threads", "1",
            "-o", str(folder / f"{MODEL}.safetensors"),
        ])  # fmt: skip
        new = folder / f"{MODEL}.toml"
        row.after = _errors(new, self.args.valid)
        row.seconds["fine-tune"] = time.monotonic() - start

        start = time.monotonic()
        reply = httpx.put(self._url(f"/v1/models/{MODEL}"), json={"path": str(new)}, timeout=600)
        reply.raise_for_status()
        row.sha = str(reply.json().get("model_sha", ""))
        row.seconds["swap"] = time.monotonic() - start
        print(f"round {index} done: now serving {row.sha}", flush=True)
        return row

    def _served_committee(self, index: int) -> Path:
        return self.work / f"round{index}" / f"{MODEL}.toml"

    def _select(self, index: int) -> Path | None:
        """The round's most uncertain captured structures not taken before."""
        import ase.io

        from cace_server.capture import read_capture

        taken_file = self.work / "taken.json"
        taken = set(json.loads(taken_file.read_text())) if taken_file.exists() else set()
        records = []
        for path in sorted((self.work / "capture").glob("capture-*.xyz")):
            for atoms in read_capture(path).records:
                key = f"{path.name}:{atoms.info['seq']}"
                if key not in taken:
                    per_atom = float(atoms.info["energy_uncertainty_per_atom"])
                    records.append((per_atom, key, atoms))
        if not records:
            return None
        records.sort(key=lambda r: -r[0])
        chosen = records[: self.args.label]
        taken.update(key for _, key, _ in chosen)
        taken_file.write_text(json.dumps(sorted(taken)))
        out = self.work / f"selected-{index}.extxyz"
        ase.io.write(out, [atoms for _, _, atoms in chosen], format="extxyz")
        return out

    def _captured_between(self, first: int, last: int) -> int:
        """Captured beads of i-PI steps first+1..last (a connection's n-th evaluation
        is step n - 1: the first is the initial force evaluation)."""
        from cace_server.capture import read_capture

        count = 0
        for path in sorted((self.work / "capture").glob("capture-*.xyz")):
            for atoms in read_capture(path).records:
                if atoms.info.get("origin") == "ipi":
                    step = int(atoms.info["origin_step"]) - 1
                    count += first < step <= last
        return count

    def _ipi_step(self) -> int:
        out = self.work / "ipi" / "al.out"
        if not out.exists():
            return 0
        rows = [line.split() for line in out.read_text().splitlines() if not line.startswith("#")]
        return int(float(rows[-1][0])) if rows and rows[-1] else 0

    def _check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args[0]} exited with status {proc.returncode}")

    # -- report --------------------------------------------------------------------------------
    def _print(self, rounds: list[Round]) -> None:
        print(
            "\n| round | i-PI steps | captured | labelled (total) | above threshold "
            "| E RMSE meV/atom before -> after | F RMSE meV/Å before -> after "
            "| run s | label s | fine-tune s | swap s | serving |"
        )
        print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
        for r in rounds:
            s = r.seconds
            print(
                f"| {r.index} | {r.steps} | {r.captured} | {r.labelled} | {r.above:.1%} "
                f"| {r.before[0]:.2f} -> {r.after[0]:.2f} | {r.before[1]:.1f} -> {r.after[1]:.1f} "
                f"| {s['run']:.0f} | {s['label']:.0f} | {s['fine-tune']:.0f} | {s['swap']:.1f} "
                f"| {r.sha} |"
            )


def _errors(committee: Path, valid: Path) -> tuple[float, float]:
    """Validation RMSE of the committee mean: energy (meV/atom), forces (meV/Å)."""
    from cace_server.model import load_served
    from cace_server.train.data import DataKeys, read_labelled
    from cace_server.train.report import dataset_errors

    model = load_served(committee, dtype="float64")
    summary = dataset_errors(model, read_labelled([valid], DataKeys())).summary()
    return summary["energy_rmse"], summary["forces_rmse"]


def _frames(path: Path) -> int:
    from cace_server.train.label import labelled_keys

    return sum(1 for _ in labelled_keys(path)) if path.exists() else 0


def _run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise SystemExit(f"{' '.join(command[2:4])} failed with status {proc.returncode}")


def _ipi_script() -> str:
    """i-PI's launcher: beside this Python (a virtual environment), else on PATH."""
    beside = Path(sys.executable).with_name("i-pi")
    return str(beside) if beside.exists() else shutil.which("i-pi") or "i-pi"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()
