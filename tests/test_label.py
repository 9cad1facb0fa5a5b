"""`cace-server label`: reference labels for captured structures, resumable.

Capture files are built with the capture's own encoder; the reference calculator
is ASE's EMT (and GFN2-xTB through tblite, which the bundled water data came from).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cace_server.capture import Origin, Record, encode_record, read_capture
from cace_server.cli import app
from cace_server.structures import Structure
from cace_server.train import DataKeys, read_labelled
from cace_server.train.label import labelled_keys, structure_key
from tests.test_train import emt_frames

ROOT = Path(__file__).resolve().parent.parent
WATER_TEST = ROOT / "data" / "water_gfn2_test.extxyz.gz"
EMT = "ase.calculators.emt:EMT"
COUNTING = "tests.label_support:CountingEMT"
runner = CliRunner()


def record(seq: int, atoms) -> bytes:
    n = len(atoms)
    return encode_record(
        seq,
        Record(
            model="cu",
            structure=Structure.from_ase(atoms),
            mean_energy=1234.5,
            member_energies=np.array([1234.0, 1235.0]),
            energy_uncertainty=0.7,
            mean_forces=np.full((n, 3), 7.0),
            forces_uncertainty=np.ones(n),
            origin=Origin("ipi", "conn-1", address="/tmp/ipi_x", step=seq),
            index=0,
            wall_time=time.time(),
        ),
    )


def capture_file(path: Path, frames: list, torn: bool = False) -> Path:
    data = b"".join(record(i + 1, a) for i, a in enumerate(frames))
    if torn:  # a server killed while writing the next record
        data += record(len(frames) + 1, frames[0])[:60]
    path.write_bytes(data)
    return path


def computed(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def counting_args(log: Path, **more) -> str:
    return json.dumps({"log": str(log), **more})


def test_labels_a_capture_file_with_reference_labels_not_predictions(tmp_path: Path):
    frames = emt_frames(6, seed=3)
    inp = capture_file(tmp_path / "capture-1.xyz", frames, torn=True)
    out = tmp_path / "labelled.extxyz"
    result = runner.invoke(app, ["label", str(inp), "-o", str(out), "--calculator", EMT])
    assert result.exit_code == 0, result.output
    assert "labelled 6, already labelled 0, failed 0 of 6" in result.output
    assert "skipped a torn last record" in result.output
    assert f"labelled {inp}:seq 6 (6/6)" in result.output

    labelled = read_labelled([out], DataKeys())  # train's default keys, as is
    assert len(labelled) == 6
    from ase.calculators.emt import EMT as Reference

    for atoms, got in zip(frames, labelled, strict=True):
        reference = atoms.copy()
        reference.calc = Reference()
        assert got.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
        assert got.energy != pytest.approx(1234.5)
        np.testing.assert_allclose(got.forces, reference.get_forces(), atol=1e-6)
        if atoms.pbc.all():
            assert got.stress is not None
            voigt = got.stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
            np.testing.assert_allclose(voigt, reference.get_stress(), atol=1e-6)
        else:
            assert got.stress is None

    # the capture's predictions and provenance stay, under their own names
    kept = read_capture(out).records
    assert [a.info["seq"] for a in kept] == [1, 2, 3, 4, 5, 6]
    assert all(a.info["mean_energy"] == 1234.5 for a in kept)
    assert all(np.all(a.arrays["mean_forces"] == 7.0) for a in kept)
    assert all(a.info["label_calculator"] == EMT for a in kept)
    assert list(labelled_keys(out)) == [structure_key(a) for a in frames]


def test_rerun_skips_labelled_structures_and_drops_a_torn_last_frame(tmp_path: Path):
    frames = emt_frames(5, seed=4)
    inp = capture_file(tmp_path / "capture-1.xyz", frames)
    out, log = tmp_path / "labelled.extxyz", tmp_path / "calls.log"
    args = ["label", str(inp), "-o", str(out), "--calculator", COUNTING]
    result = runner.invoke(app, [*args, "--calculator-args", counting_args(log)])
    assert result.exit_code == 0, result.output
    first = set(computed(log))
    assert first == {structure_key(a) for a in frames}

    # interrupted while writing the last frame: its tail never reached the file
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])
    log.unlink()
    result = runner.invoke(app, [*args, "--calculator-args", counting_args(log)])
    assert result.exit_code == 0, result.output
    assert "dropped a torn last frame" in result.output
    assert "labelled 1, already labelled 4" in result.output
    assert set(computed(log)) == {structure_key(frames[-1])}
    assert list(labelled_keys(out)) == [structure_key(a) for a in frames]
    assert len(read_labelled([out], DataKeys())) == 5

    # nothing left: nothing computed, the output unchanged
    log.unlink()
    before = out.read_bytes()
    result = runner.invoke(app, [*args, "--calculator-args", counting_args(log)])
    assert result.exit_code == 0 and "labelled 0, already labelled 5" in result.output
    assert computed(log) == [] and out.read_bytes() == before


def test_killed_labelling_resumes_without_recomputing(tmp_path: Path):
    frames = emt_frames(8, seed=5)
    inp = capture_file(tmp_path / "capture-1.xyz", frames)
    out, log1, log2 = tmp_path / "labelled.extxyz", tmp_path / "run1.log", tmp_path / "run2.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "cace_server.cli", "label", str(inp), "-o", str(out)]
    command += ["--calculator", COUNTING]
    proc = subprocess.Popen(
        [*command, "--calculator-args", counting_args(log1, delay=0.4)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list(labelled_keys(out)) if out.exists() else []) < 3:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "labelling made no progress"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        if proc.stdout:
            proc.stdout.close()
    written = list(labelled_keys(out))
    assert 3 <= len(written) < len(frames)

    done = subprocess.run(
        [*command, "--calculator-args", counting_args(log2)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"already labelled {len(written)}" in done.stdout
    again = set(computed(log2))
    assert again.isdisjoint(written)  # nothing labelled before the kill is computed again
    assert again | set(written) == {structure_key(a) for a in frames}
    assert sorted(labelled_keys(out)) == sorted(structure_key(a) for a in frames)


def test_a_failing_calculator_costs_only_its_structures(tmp_path: Path):
    frames = emt_frames(6, seed=6)  # frames 0 and 3 are 5-atom clusters
    inp = capture_file(tmp_path / "capture-1.xyz", frames)
    out, log = tmp_path / "labelled.extxyz", tmp_path / "calls.log"
    args = ["label", str(inp), "-o", str(out), "--calculator", COUNTING]
    result = runner.invoke(app, [*args, "--calculator-args", counting_args(log, fail_natoms=5)])
    assert result.exit_code == 1, result.output
    assert f"failed: {inp}:seq 1: RuntimeError: no convergence for 5 atoms" in result.output
    assert f"failed: {inp}:seq 4:" in result.output
    assert "labelled 4, already labelled 0, failed 2 of 6 structures" in result.output
    assert "error: 2 structure(s) failed" in result.output
    assert len(read_labelled([out], DataKeys())) == 4

    log.unlink()
    result = runner.invoke(app, [*args, "--calculator-args", counting_args(log)])
    assert result.exit_code == 0, result.output
    assert "labelled 2, already labelled 4, failed 0" in result.output
    assert set(computed(log)) == {structure_key(frames[0]), structure_key(frames[3])}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--calculator", "EMT"], "--calculator must be MODULE:CLASS"),
        (["--calculator", "no_such_module_x:Calc"], "cannot import 'no_such_module_x'"),
        (["--calculator", "ase.calculators.emt:Nope"], "has no attribute 'Nope'"),
        (["--calculator", EMT, "--calculator-args", "{bad"], "is not valid JSON"),
        (["--calculator", EMT, "--calculator-args", "[1]"], "must be a JSON object"),
        (["--calculator", COUNTING], "cannot build the calculator: TypeError"),
    ],
)
def test_bad_calculators_are_clear_errors(tmp_path: Path, options: list[str], message: str):
    inp = capture_file(tmp_path / "capture-1.xyz", emt_frames(1))
    out = tmp_path / "out.extxyz"
    result = runner.invoke(app, ["label", str(inp), "-o", str(out), *options])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_bad_inputs_and_outputs_are_clear_errors(tmp_path: Path):
    inp = capture_file(tmp_path / "capture-1.xyz", emt_frames(1))
    cases = [
        ([str(tmp_path / "missing.xyz"), "-o", str(tmp_path / "o.xyz")], "does not exist"),
        ([str(inp), "-o", str(tmp_path / "o.extxyz.gz")], "must be a plain extended XYZ"),
    ]
    (tmp_path / "garbage.xyz").write_text("not xyz\nat all\n")
    cases.append(([str(tmp_path / "garbage.xyz"), "-o", str(tmp_path / "o.xyz")], "cannot read"))
    (tmp_path / "notours.xyz").write_text("hello\n")
    cases.append(([str(inp), "-o", str(tmp_path / "notours.xyz")], "not an extended XYZ file"))
    cases.append(([str(inp), "-o", str(inp)], "is also an input"))
    for args, message in cases:
        result = runner.invoke(app, ["label", *args, "--calculator", EMT])
        assert result.exit_code == 2, result.output
        assert message in result.output


def test_train_reads_the_labelled_file_as_is(tmp_path: Path):
    inp = capture_file(tmp_path / "capture-1.xyz", emt_frames(12, seed=7))
    out = tmp_path / "labelled.extxyz"
    result = runner.invoke(app, ["label", str(inp), "-o", str(out), "--calculator", EMT])
    assert result.exit_code == 0, result.output
    (tmp_path / "t.toml").write_text(
        "cutoff = 4.0\nn_radial = 6\nmax_l = 2\nmax_nu = 2\nhidden = [16]\nepochs = 2\n"
    )
    model = tmp_path / "model.safetensors"
    result = runner.invoke(
        app, ["train", str(out), "-c", str(tmp_path / "t.toml"), "-o", str(model), "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output and model.is_file()


def test_gfn2_xtb_labels_reproduce_the_bundled_water_data(tmp_path: Path):
    pytest.importorskip("tblite.ase")
    from ase.io import read

    box = read(WATER_TEST, index=0)  # 96 atoms, periodic, GFN2-xTB labels from tblite
    reference = box.calc.results
    inp = capture_file(tmp_path / "capture-1.xyz", [box])
    out = tmp_path / "labelled.extxyz"
    arguments = json.dumps({"method": "GFN2-xTB", "electronic_temperature": 300.0, "verbosity": 0})
    result = runner.invoke(
        app,
        ["label", str(inp), "-o", str(out), "--calculator", "tblite.ase:TBLite",
         "--calculator-args", arguments],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (got,) = read_labelled([out], DataKeys())
    assert got.energy == pytest.approx(reference["energy"], abs=1e-4)
    np.testing.assert_allclose(got.forces, reference["forces"], atol=1e-4)
    assert got.stress is not None
    voigt = got.stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    np.testing.assert_allclose(voigt, reference["stress"], atol=1e-6)
