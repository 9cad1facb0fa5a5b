"""The trainer: real extended XYZ files, real ASE labels (EMT), the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cace_server.cli import app
from cace_server.model import load_model
from cace_server.model.io import read_metadata
from cace_server.structures import Structure
from cace_server.train import (
    DataError,
    DataKeys,
    TrainConfig,
    Trainer,
    fit_reference_energies,
    read_labelled,
    split,
)

runner = CliRunner()


def emt_frames(n: int, seed: int = 0, rename: dict[str, str] | None = None) -> list:
    """Cu/Al bulk cells (periodic, with stress) and clusters (non-periodic), EMT labels."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        if i % 3:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
            atoms.numbers[rng.choice(len(atoms), 2, replace=False)] = 13
            atoms.set_cell(atoms.cell * (1 + rng.uniform(-0.03, 0.03)), scale_atoms=True)
            atoms.rattle(0.08, seed=int(rng.integers(1 << 30)))
        else:
            atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))[:5]
            atoms.pbc = False
            atoms.cell = np.zeros((3, 3))
            atoms.numbers[0] = 13
            atoms.rattle(0.1, seed=int(rng.integers(1 << 30)))
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        atoms.calc = None
        if rename:
            atoms.info[rename["energy"]] = results["energy"]
            atoms.arrays[rename["forces"]] = results["forces"]
            if "stress" in results:
                atoms.info[rename["stress"]] = results["stress"]
        else:
            atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


@pytest.fixture(scope="module")
def emt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ase.io import write

    path = tmp_path_factory.mktemp("data") / "emt.extxyz"
    write(path, emt_frames(24), format="extxyz")
    return path


def small_config(tmp: Path, **overrides) -> TrainConfig:
    settings = dict(
        output=str(tmp / "model.safetensors"),
        cutoff=4.0,
        n_radial=6,
        max_l=2,
        max_nu=2,
        hidden=[16],
        batch_size=4,
        lr=1e-2,
        epochs=6,
        seed=3,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# -- data -------------------------------------------------------------------------------------
def test_reads_calculator_and_custom_keys(tmp_path: Path):
    from ase.io import write

    write(tmp_path / "plain.xyz", emt_frames(4), format="extxyz")
    keys = {"energy": "REF_energy", "forces": "REF_forces", "stress": "REF_stress"}
    write(tmp_path / "custom.xyz", emt_frames(4, rename=keys), format="extxyz")
    plain = read_labelled([tmp_path / "plain.xyz"], DataKeys())
    custom = read_labelled(
        [tmp_path / "custom.xyz"], DataKeys("REF_energy", "REF_forces", "REF_stress")
    )
    assert len(plain) == len(custom) == 4
    for a, b in zip(plain, custom, strict=True):
        assert a.energy == pytest.approx(b.energy, abs=1e-9)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-9)
        assert (a.stress is None) == (b.stress is None)
        if a.stress is not None:
            np.testing.assert_allclose(a.stress, b.stress, atol=1e-9)
            np.testing.assert_allclose(a.stress, a.stress.T)
    assert plain[0].stress is None and not plain[0].structure.is_periodic
    assert plain[1].stress is not None


def test_missing_key_names_file_frame_and_flag(tmp_path: Path):
    from ase.io import write

    write(tmp_path / "d.xyz", emt_frames(2), format="extxyz")
    with pytest.raises(DataError, match=r"d.xyz:0: no energy under key 'REF_energy'.*--energy-key"):
        read_labelled([tmp_path / "d.xyz"], DataKeys(energy="REF_energy"))
    with pytest.raises(DataError, match=r"no forces under key 'F'.*--forces-key"):
        read_labelled([tmp_path / "d.xyz"], DataKeys(forces="F"))


def test_nan_forces_are_refused(tmp_path: Path):
    from ase.io import write

    frames = emt_frames(3)
    forces = frames[2].calc.results["forces"]
    forces[1, 0] = np.nan
    write(tmp_path / "nan.xyz", frames, format="extxyz")
    with pytest.raises(DataError, match=r"nan.xyz:2: forces contain NaN"):
        read_labelled([tmp_path / "nan.xyz"], DataKeys())


def test_garbage_and_missing_files(tmp_path: Path):
    (tmp_path / "junk.xyz").write_text("this is not\nan xyz file\n")
    with pytest.raises(DataError, match=r"junk\.xyz"):
        read_labelled([tmp_path / "junk.xyz"], DataKeys())
    with pytest.raises(DataError, match="does not exist"):
        read_labelled([tmp_path / "absent.xyz"], DataKeys())


def test_reference_energies_least_squares(emt_file: Path):
    data = read_labelled([emt_file], DataKeys())
    refs = fit_reference_energies(data, [13, 29])
    # Exact for synthetic energies that are sums of per-element terms.
    synthetic = [
        type(d)(d.structure, float(sum({13: -1.5, 29: 2.25}[int(z)] for z in d.structure.numbers)),
                d.forces, d.stress)
        for d in data
    ]  # fmt: skip
    exact = fit_reference_energies(synthetic, [13, 29])
    assert exact[13] == pytest.approx(-1.5) and exact[29] == pytest.approx(2.25)
    assert set(refs) == {13, 29}


def test_split_is_deterministic_and_disjoint(emt_file: Path):
    data = read_labelled([emt_file], DataKeys())
    a_train, a_valid = split(data, 0.25, seed=1)
    _, b_valid = split(data, 0.25, seed=1)
    assert [d.source for d in a_valid] == [d.source for d in b_valid]
    assert len(a_valid) == 6 and len(a_train) == 18
    assert not {d.source for d in a_train} & {d.source for d in a_valid}


def test_config_layers_toml_and_overrides(tmp_path: Path):
    (tmp_path / "t.toml").write_text("cutoff = 4.5\nepochs = 3\nhidden = [8, 8]\n")
    cfg = TrainConfig.load(tmp_path / "t.toml", epochs=9, lr=None)
    assert (cfg.cutoff, cfg.epochs, cfg.hidden, cfg.lr) == (4.5, 9, [8, 8], 5e-3)
    (tmp_path / "bad.toml").write_text("cutof = 4.5\n")
    with pytest.raises(ValueError, match="unknown training settings: cutof"):
        TrainConfig.load(tmp_path / "bad.toml")


# -- training ---------------------------------------------------------------------------------
def test_training_lowers_validation_loss_and_writes_a_loadable_model(
    emt_file: Path, tmp_path: Path
):
    data = read_labelled([emt_file], DataKeys())
    train, valid = split(data, 0.25, seed=0)
    cfg = small_config(tmp_path, epochs=8, early_stopping=0)
    trainer = Trainer(cfg, train, valid, data_digest="abc", log=lambda _: None)
    before = trainer.validate()["loss"]
    best = trainer.run()
    assert best["valid"]["loss"] < 0.5 * before
    assert all(math.isfinite(r["train"]["loss"]) for r in trainer.history)

    model = load_model(cfg.output)
    meta = read_metadata(cfg.output)["extra"]["training"]
    assert meta["data_sha256"] == "abc" and meta["epoch"] == best["epoch"]
    assert meta["errors"]["valid"]["forces_rmse"] == pytest.approx(best["valid"]["forces_rmse"])
    # The written model is the EMA model of the best epoch: its errors are reproducible.
    from cace_server.train.report import dataset_errors

    errors = dataset_errors(model, valid).summary()
    assert errors["forces_rmse"] == pytest.approx(best["valid"]["forces_rmse"], rel=1e-3)
    assert errors["energy_rmse"] == pytest.approx(best["valid"]["energy_rmse"], rel=1e-2, abs=1e-3)
    prediction = model.predict([valid[0].structure])[0]
    assert prediction.forces is not None and np.all(np.isfinite(prediction.forces))


def test_resume_continues_exactly(emt_file: Path, tmp_path: Path):
    data = read_labelled([emt_file], DataKeys())
    train, valid = split(data, 0.25, seed=0)
    quiet = dict(log=lambda _: None)

    straight = Trainer(small_config(tmp_path / "a", epochs=4), train, valid, **quiet)
    straight.run()

    first = Trainer(small_config(tmp_path / "b", epochs=2), train, valid, **quiet)
    first.run()
    resumed = Trainer(small_config(tmp_path / "b", epochs=4), train, valid, **quiet)
    resumed.resume()
    assert resumed.epoch == 2
    resumed.run()
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["valid"]["loss"] == pytest.approx(b["valid"]["loss"], rel=1e-5)


def test_resume_refuses_a_different_model(emt_file: Path, tmp_path: Path):
    data = read_labelled([emt_file], DataKeys())
    train, valid = split(data, 0.25, seed=0)
    Trainer(small_config(tmp_path, epochs=1), train, valid, log=lambda _: None).run()
    other = Trainer(small_config(tmp_path, epochs=2, max_l=3), train, valid, log=lambda _: None)
    with pytest.raises(ValueError, match="max_l"):
        other.resume()


def test_unknown_element_at_serve_time_is_a_clear_error(emt_file: Path, tmp_path: Path):
    data = read_labelled([emt_file], DataKeys())
    train, valid = split(data, 0.25, seed=0)
    cfg = small_config(tmp_path, epochs=1)
    Trainer(cfg, train, valid, log=lambda _: None).run()
    model = load_model(cfg.output)
    water = Structure.create([8, 1, 1], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    with pytest.raises(ValueError, match="element"):
        model.predict([water])


# -- command line -----------------------------------------------------------------------------
def test_cli_train_evaluate_and_info(emt_file: Path, tmp_path: Path):
    out = tmp_path / "cli.safetensors"
    (tmp_path / "t.toml").write_text(
        "cutoff = 4.0\nn_radial = 6\nmax_l = 2\nmax_nu = 2\nhidden = [16]\nepochs = 2\n"
    )
    result = runner.invoke(
        app, ["train", str(emt_file), "-c", str(tmp_path / "t.toml"), "-o", str(out), "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert "F RMSE" in result.output and "best epoch" in result.output
    assert out.is_file() and (tmp_path / "cli.checkpoint.pt").is_file()

    plot = tmp_path / "parity.png"
    result = runner.invoke(app, ["evaluate", str(out), str(emt_file), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "F RMSE" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    result = runner.invoke(app, ["info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["extra"]["training"]["n_train"] > 0


def test_cli_train_reports_bad_data(tmp_path: Path):
    from ase.io import write

    write(tmp_path / "d.xyz", emt_frames(3), format="extxyz")
    result = runner.invoke(
        app, ["train", str(tmp_path / "d.xyz"), "--energy-key", "nope", "-o", str(tmp_path / "m")]
    )
    assert result.exit_code == 2
    assert "no energy under key 'nope'" in result.output
    result = runner.invoke(app, ["train", "-o", str(tmp_path / "m")])
    assert result.exit_code == 2 and "no training files" in result.output
