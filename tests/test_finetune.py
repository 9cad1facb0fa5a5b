"""Fine-tuning (``train --init-from``) and committees (``train --committee``), through
the real CLI, on the bundled water data and model and a published original checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cace_server.cli import app
from cace_server.model import Committee, load_model, load_served
from cace_server.model.committee import read_committee_file
from cace_server.model.io import read_metadata
from cace_server.server import default_model_path
from cace_server.structures import Structure
from cace_server.train import DataKeys, TrainConfig, Trainer, read_labelled
from cace_server.train.committee import bootstrap, committee_paths
from cace_server.train.finetune import FINE_TUNE_LR, fine_tune_settings
from cace_server.train.report import dataset_errors
from tests.conftest import reference_file

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
WATER_DATA = ROOT / "data" / "water_gfn2_train.extxyz.gz"
# A small published model (H, O; 6,208 parameters) of the les_fit repository.
ORIGINAL = "ChengUCB_les_fit_MLIPs_CACE-LES_water_cace-r-4.5-nl-1-nu-2_best_model.pth"


@pytest.fixture(scope="module")
def few_water(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 structures of the bundled model's training data (GFN2-xTB labels)."""
    from ase.io import read, write

    path = tmp_path_factory.mktemp("water") / "few.extxyz"
    write(path, read(WATER_DATA, index=":10"), format="extxyz")
    return path


def train(*args: str) -> str:
    result = runner.invoke(app, ["train", *args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    return result.output


def test_init_from_bundled_model_starts_at_its_level(few_water: Path, tmp_path: Path):
    out = tmp_path / "tuned.safetensors"
    output = train(
        str(few_water), "--init-from", str(default_model_path()), "--epochs", "1",
        "--valid-fraction", "0.3", "-o", str(out),
    )  # fmt: skip
    assert "reference energies shifted" in output
    record = read_metadata(out)["extra"]["training"]
    assert record["settings"]["lr"] == FINE_TUNE_LR
    assert record["settings"]["dtype"] == "float32"  # the bundled model's
    assert record["init_from"] == str(default_model_path())
    # The starting model's error on these structures (it was trained on them): the
    # first epoch's training error stays at that level; from scratch it is 100x larger.
    data = read_labelled([few_water], DataKeys())
    start = dataset_errors(load_model(default_model_path()), data).summary()
    first = record["errors"]["train"]
    assert first["forces_rmse"] < 1.25 * start["forces_rmse"]
    assert first["energy_rmse"] < start["energy_rmse"] + 3.0  # meV/atom
    assert record["initial_errors"]["forces_rmse"] < 1.25 * start["forces_rmse"]

    served = load_served(out)
    assert not isinstance(served, Committee)
    assert served.config.cutoff == 5.0 and served.n_parameters == 24572
    prediction = served.predict([data[0].structure], ["energy", "forces"])[0]
    assert abs(prediction.energy - data[0].energy) / data[0].n_atoms < 0.01


def test_init_from_refuses_another_architecture(few_water: Path, tmp_path: Path):
    result = runner.invoke(
        app,
        [
            "train", str(few_water), "--init-from", str(default_model_path()),
            "--cutoff", "4.0", "--max-l", "3", "-o", str(tmp_path / "m.safetensors"),
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "keeps the model's architecture" in result.output
    assert "cutoff 4.0 was given, the model has 5.0" in result.output
    assert "max_l" not in result.output  # the same value is accepted
    result = runner.invoke(
        app,
        ["train", str(few_water), "--init-from", str(tmp_path / "absent.safetensors")],
    )
    assert result.exit_code == 2 and "does not exist" in result.output


def test_settings_default_for_a_fine_tune():
    model = load_model(default_model_path(), dtype="float64")
    cfg = TrainConfig(init_from="m", lr=5e-3)
    assert fine_tune_settings(cfg, model, set()).lr == FINE_TUNE_LR
    assert fine_tune_settings(cfg, model, set()).dtype == "float64"
    assert fine_tune_settings(cfg, model, {"lr"}).lr == 5e-3
    cfg = TrainConfig(init_from="m", hidden=[8])
    with pytest.raises(ValueError, match=r"hidden \[8\] was given, the model has \[32, 16\]"):
        fine_tune_settings(cfg, model, {"hidden"})


def _labelled_by(model, frames: list, offset_per_atom: float, seed: int) -> list:
    """Frames labelled with ``model`` plus a per-atom energy offset and force noise."""
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    predictions = model.predict([Structure.from_ase(a) for a in frames], ["energy", "forces"])
    for atoms, p in zip(frames, predictions, strict=True):
        atoms.calc = SinglePointCalculator(
            atoms,
            energy=float(p.energy) + offset_per_atom * len(atoms),
            forces=p.forces + rng.normal(0.0, 0.02, p.forces.shape),
        )
    return frames


def test_reference_energies_shift_to_another_energy_zero(tmp_path: Path):
    """Data 0.5 eV/atom above the model: "shift" starts at the model's level, "keep" does not."""
    from ase.io import read

    from cace_server.model import convert_original

    original = convert_original(reference_file(f"published/{ORIGINAL}"))
    frames = _labelled_by(original, read(WATER_DATA, index=":4"), 0.5, 0)
    data = read_labelled_frames(frames, tmp_path)
    errors = {}
    for mode in ("shift", "keep"):
        cfg = TrainConfig(init_from=ORIGINAL, reference_energies=mode, output=str(tmp_path / "x"))
        trainer = Trainer(cfg, data[:3], data[3:], log=lambda _: None, initial=original)
        errors[mode] = trainer.validate()["energy_rmse"]
    assert errors["shift"] < 1.0  # meV/atom
    assert errors["keep"] == pytest.approx(500.0, rel=1e-3)


def read_labelled_frames(frames: list, tmp_path: Path) -> list:
    from ase.io import write

    path = tmp_path / "labelled.extxyz"
    write(path, frames, format="extxyz")
    return read_labelled([path], DataKeys())


def test_init_from_original_checkpoint_fine_tunes_and_serves(tmp_path: Path):
    from ase.io import read, write

    from cace_server.model import convert_original

    checkpoint = reference_file(f"published/{ORIGINAL}")
    frames = _labelled_by(convert_original(checkpoint), read(WATER_DATA, index="10:16"), 0.5, 1)
    data_file = tmp_path / "labelled.extxyz"
    write(data_file, frames, format="extxyz")
    out = tmp_path / "from_original.safetensors"
    output = train(
        str(data_file), "--init-from", str(checkpoint), "--epochs", "1",
        "--valid-fraction", "0.34", "-o", str(out),
    )  # fmt: skip
    assert "best epoch 1" in output
    meta = read_metadata(out)
    assert meta["extra"]["training"]["init_from"] == str(checkpoint)
    assert meta["config"]["cutoff"] == 4.5 and meta["config"]["max_l"] == 2
    served = load_served(out)
    data = read_labelled([data_file], DataKeys())
    predictions = served.predict([d.structure for d in data], ["energy", "forces"])
    for d, p in zip(data, predictions, strict=True):
        assert p.forces is not None and np.isfinite(p.forces).all()
        # on the data's energy zero (0.5 eV/atom above the original's)
        assert abs(p.energy - d.energy) / d.n_atoms < 0.005


@pytest.fixture(scope="module")
def committee_file(few_water: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("committee") / "water.safetensors"
    output = train(
        str(few_water), "--init-from", str(default_model_path()), "--committee", "2",
        "--epochs", "1", "--valid-fraction", "0.3", "-o", str(out),
    )  # fmt: skip
    assert "member 2/2" in output and "alpha = " in output
    assert "observed RMSE" in output  # the calibration table
    return out.with_suffix(".toml")


def test_committee_writes_a_calibrated_committee_that_serves(committee_file: Path, few_water):
    members = [committee_file.with_name(f"water_member{i}.safetensors") for i in range(2)]
    assert all(m.is_file() for m in members)
    spec = read_committee_file(committee_file)
    assert [p.name for p in spec.members] == [m.name for m in members]
    assert spec.alpha > 0 and spec.calibration["quantity"] == "energy"
    assert spec.calibration["structures"] == 3
    seeds = [read_metadata(m)["extra"]["training"]["settings"]["seed"] for m in members]
    assert seeds == [0, 1]

    served = load_served(committee_file)
    assert isinstance(served, Committee) and served.alpha == spec.alpha
    data = read_labelled([few_water], DataKeys())[:2]
    (p, _) = served.predict([d.structure for d in data], ["energy", "energy_uncertainty"])
    assert p.energy_uncertainty is not None and p.energy_uncertainty > 0


def test_committee_fine_tunes_member_by_member(committee_file: Path, few_water, tmp_path: Path):
    out = tmp_path / "round2.safetensors"
    output = train(
        str(few_water), "--init-from", str(committee_file), "--epochs", "1",
        "--valid-fraction", "0.3", "-o", str(out),
    )  # fmt: skip
    assert "member 2/2" in output
    starts = [
        read_metadata(out.with_name(f"round2_member{i}.safetensors"))["extra"]["training"]
        for i in range(2)
    ]
    assert [s["init_from"] for s in starts] == [str(committee_file)] * 2
    assert read_committee_file(out.with_suffix(".toml")).alpha > 0
    result = runner.invoke(
        app,
        ["train", str(few_water), "--init-from", str(committee_file), "--committee", "3"],
    )
    assert result.exit_code == 2 and "committee of 2 members" in result.output


def test_bootstrap_and_paths_are_deterministic():
    data = list(range(20))
    resample, left_out = bootstrap(data, 4)  # type: ignore[arg-type]
    assert len(resample) == 20 and set(resample).isdisjoint(left_out)
    assert set(resample) | set(left_out) == set(data)
    assert bootstrap(data, 4) == (resample, left_out)  # type: ignore[arg-type]
    assert bootstrap(data, 5) != (resample, left_out)  # type: ignore[arg-type]
    target, members = committee_paths("out/m.safetensors", 2)
    assert target == Path("out/m.toml")
    assert members == [Path("out/m_member0.safetensors"), Path("out/m_member1.safetensors")]
