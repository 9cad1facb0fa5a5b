"""A committee served as one model: its members one by one, its spread, its files,
its start-up errors and its calibration (``cace-server calibrate``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cace_server.model import (
    Committee,
    CommitteeError,
    load_model,
    load_served,
    random_model,
    save_model,
)
from cace_server.model.committee import (
    CommitteeSpec,
    committee_spec,
    read_committee_file,
    write_committee_file,
)
from cace_server.outputs import COMMITTEE_OUTPUTS, Outputs
from cace_server.server import default_model_path
from cace_server.structures import Structure
from tests.test_model_conformance import _water_box, _water_cluster

HERE = Path(__file__).resolve().parent
SEEDS = [HERE / "data" / "committee" / f"seed{i}.safetensors" for i in range(1, 5)]
TEST_DATA = HERE.parent / "data" / "water_gfn2_test.extxyz.gz"
EVERYTHING = ["energy", "forces", "stress", *COMMITTEE_OUTPUTS]


def _structures() -> list[Structure]:
    return [_water_box(2, seed=3), _water_cluster(seed=4)]


def _check_against_members(committee: Committee, members: list, alpha: float) -> None:
    """Mean and each member equal the members evaluated one by one (float64)."""
    structures = _structures()
    got = committee.predict(structures, EVERYTHING)
    alone = [m.predict(structures, ["energy", "forces", "stress"]) for m in members]
    for b, p in enumerate(got):
        energies = np.array([run[b].energy for run in alone])
        forces = np.stack([run[b].forces for run in alone])
        np.testing.assert_allclose(p.committee_energies, energies, rtol=0, atol=1e-10)
        np.testing.assert_allclose(p.energy, energies.mean(), rtol=0, atol=1e-10)
        np.testing.assert_allclose(p.committee_forces, forces, rtol=0, atol=1e-10)
        np.testing.assert_allclose(p.forces, forces.mean(0), rtol=0, atol=1e-10)
        assert p.energy_uncertainty == pytest.approx(alpha * np.std(energies, ddof=1), abs=1e-10)
        by_hand = alpha * np.sqrt(np.var(forces, axis=0, ddof=1).sum(-1))
        np.testing.assert_allclose(p.forces_uncertainty, by_hand, rtol=0, atol=1e-10)
        if structures[b].pbc.all():
            virials = np.stack([run[b].virial for run in alone])
            np.testing.assert_allclose(p.committee_virials, virials, rtol=0, atol=1e-10)
            np.testing.assert_allclose(p.virial, virials.mean(0), rtol=0, atol=1e-10)
            np.testing.assert_allclose(
                p.stress, np.mean([run[b].stress for run in alone], axis=0), rtol=0, atol=1e-10
            )


def test_four_seeds_equal_their_members_one_by_one() -> None:
    spec = CommitteeSpec(tuple(SEEDS), alpha=1.7)
    from cace_server.model.committee import load_committee

    committee = load_committee(spec, dtype="float64")
    members = [load_model(p, dtype="float64") for p in SEEDS]
    _check_against_members(committee, members, alpha=1.7)


def test_a_mixed_architecture_committee_equals_its_members(tmp_path: Path) -> None:
    bundled = load_model(default_model_path(), dtype="float64")
    mp = random_model(bundled.elements, seed=3, cutoff=bundled.cutoff, num_message_passing=1)
    save_model(mp, tmp_path / "mp.safetensors")
    committee = load_served(
        f"{default_model_path()},{tmp_path / 'mp.safetensors'}", dtype="float64"
    )
    assert isinstance(committee, Committee)
    assert committee.describe()["committee"]["evaluation"] == "member loop"  # type: ignore[index]
    members = [bundled, load_model(tmp_path / "mp.safetensors", dtype="float64")]
    _check_against_members(committee, members, alpha=1.0)


def test_only_what_is_asked_comes_back() -> None:
    committee = load_served(",".join(map(str, SEEDS[:2])), dtype="float64")
    p = committee.predict(_structures()[:1], ["energy", "energy_uncertainty"])[0]
    assert p.energy_uncertainty is not None and p.committee_forces is None
    assert set(p.array_outputs()) <= Outputs(["energy", "energy_uncertainty"]).fields


def test_committee_file_round_trip(tmp_path: Path) -> None:
    spec = CommitteeSpec(tuple(SEEDS), alpha=2.5, calibration={"data": "x.extxyz", "structures": 3})
    path = tmp_path / "c.toml"
    write_committee_file(path, spec)
    back = read_committee_file(path)
    assert [p.resolve() for p in back.members] == [p.resolve() for p in SEEDS]
    assert back.alpha == 2.5 and back.calibration == spec.calibration
    assert back.source == path
    # members next to the file are written relative to it
    local = tmp_path / "m"
    local.mkdir()
    copies = []
    for p in SEEDS[:2]:
        (local / p.name).write_bytes(p.read_bytes())
        copies.append(local / p.name)
    write_committee_file(local / "c.toml", CommitteeSpec(tuple(copies)))
    assert '"seed1.safetensors"' in (local / "c.toml").read_text()
    assert load_served(local / "c.toml").size == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('members = ["a.safetensors", "b.safetensors"]\nbeta = 1\n', "unknown keys"),
        ('members = ["a.safetensors", "b.safetensors"]\nalpha = -1.0\n', "alpha must be"),
        ('members = ["a.safetensors", "b.safetensors"]\nalpha = 0\n', "alpha must be"),
        ('members = ["a.safetensors"]\n', "at least two members"),
        ("members = 3\n", "'members' must be a list"),
        ("members = [\n", "not a TOML committee file"),
    ],
)
def test_bad_committee_files_are_refused(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(CommitteeError, match=message):
        read_committee_file(path)


def test_spec_parsing() -> None:
    assert committee_spec("model.safetensors") is None
    spec = committee_spec("a.safetensors, b.safetensors")
    assert spec is not None and [p.name for p in spec.members] == ["a.safetensors", "b.safetensors"]
    with pytest.raises(CommitteeError, match="empty member"):
        committee_spec("a.safetensors,,b.safetensors")
    with pytest.raises(CommitteeError, match="does not exist"):
        committee_spec("missing.toml")


def test_members_must_share_elements_and_cutoff(tmp_path: Path) -> None:
    base = str(SEEDS[0])
    save_model(random_model((1, 6, 8), cutoff=5.0), tmp_path / "hco.safetensors")
    save_model(random_model((1, 8), cutoff=4.0), tmp_path / "short.safetensors")
    with pytest.raises(CommitteeError, match="differ in elements"):
        load_served(f"{base},{tmp_path / 'hco.safetensors'}")
    with pytest.raises(CommitteeError, match="differ in cutoff"):
        load_served(f"{base},{tmp_path / 'short.safetensors'}")
    with pytest.raises(CommitteeError, match="does not exist"):
        load_served(f"{base},{tmp_path / 'nope.safetensors'}")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cace_server.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("water=", "has no file"),
        (f"water={SEEDS[0]},,{SEEDS[1]}", "empty member"),
        (f"water={SEEDS[0]},{SEEDS[0].parent / 'nope.safetensors'}", "does not exist"),
        ("water=HCO", "differ in elements"),
        ("water=SHORT", "differ in cutoff"),
        ("water=BAD", "alpha must be a positive number"),
    ],
)
def test_serve_refuses_a_bad_committee_with_one_clear_line(
    tmp_path: Path, source: str, message: str
) -> None:
    save_model(random_model((1, 6, 8), cutoff=5.0), tmp_path / "hco.safetensors")
    save_model(random_model((1, 8), cutoff=4.0), tmp_path / "short.safetensors")
    bad = tmp_path / "bad.toml"
    bad.write_text(f'members = ["{SEEDS[0]}", "{SEEDS[1]}"]\nalpha = -2.0\n')
    source = (
        source.replace("HCO", f"{SEEDS[0]},{tmp_path / 'hco.safetensors'}")
        .replace("SHORT", f"{SEEDS[0]},{tmp_path / 'short.safetensors'}")
        .replace("BAD", str(bad))
    )
    run = _cli("serve", "--model", source, "--port", "1")
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, run.stderr


def test_calibrate_fits_alpha_and_writes_the_committee_file(tmp_path: Path) -> None:
    members = ",".join(map(str, SEEDS))
    out = tmp_path / "water.toml"
    run = _cli("calibrate", members, str(TEST_DATA), "--max-structures", "6", "-o", str(out))
    assert run.returncode == 0, run.stderr
    assert "observed RMSE" in run.stdout and f"wrote {out}" in run.stdout
    spec = read_committee_file(out)
    assert spec.calibration["structures"] == 6 and spec.calibration["quantity"] == "energy"
    assert spec.alpha == spec.calibration["alpha"] > 0

    # alpha is the maximum-likelihood scale of the raw spread, by hand
    from cace_server.model.committee import load_committee
    from cace_server.train import read_labelled
    from cace_server.train.data import DataKeys

    data = read_labelled([TEST_DATA], DataKeys())[:6]
    committee = load_committee(CommitteeSpec(tuple(SEEDS)))
    ratios = []
    for d in data:
        p = committee.predict([d.structure], ["energy", "committee_energies"])[0]
        ratios.append((d.energy - p.energy) ** 2 / np.std(p.committee_energies, ddof=1) ** 2)
    assert spec.alpha == pytest.approx(np.sqrt(np.mean(ratios)), rel=1e-9)

    # --write updates the file in place (forces this time); a list cannot be --written
    run = _cli(
        "calibrate",
        str(out),
        str(TEST_DATA),
        "--max-structures",
        "2",
        "--quantity",
        "forces",
        "--write",
    )
    assert run.returncode == 0, run.stderr
    assert read_committee_file(out).calibration["quantity"] == "forces"
    run = _cli("calibrate", members, str(TEST_DATA), "--write")
    assert run.returncode == 2 and "-o NEW.toml" in run.stderr
    run = _cli("calibrate", str(SEEDS[0]), str(TEST_DATA))
    assert run.returncode == 2 and "not a committee" in run.stderr


def test_info_describes_a_committee(tmp_path: Path) -> None:
    import json

    run = _cli("info", ",".join(map(str, SEEDS[:2])), "--json")
    assert run.returncode == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["size"] == 2 and shown["alpha"] == 1.0
    assert [m["name"] for m in shown["members"]] == ["seed1", "seed2"]
    assert "energy_uncertainty" in shown["outputs"]
    bad = tmp_path / "bad.toml"
    bad.write_text('members = ["a.safetensors", "b.safetensors"]\nalpha = 0\n')
    run = _cli("info", str(bad))
    assert run.returncode == 2 and "alpha must be" in run.stderr
