"""The same numbers on a GPU as on the CPU (skipped where no CUDA device is present)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cace_server.model.build import random_model
from cace_server.structures import Structure

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def water_box(rng: np.random.Generator, n: int = 24, length: float = 8.0) -> Structure:
    numbers = np.tile([8, 1, 1], n // 3)
    positions = rng.uniform(0, length, size=(n, 3))
    return Structure.create(numbers, positions, np.eye(3) * length, [True, True, True])


@pytest.mark.parametrize("long_range", [False, True], ids=["short", "long-range"])
def test_cuda_equals_cpu_float64(long_range: bool):
    rng = np.random.default_rng(0)
    structures = [water_box(rng), water_box(rng, 30, 9.0)]
    cpu = random_model(seed=4, long_range=long_range, device="cpu")
    gpu = random_model(seed=4, long_range=long_range, device="cuda")
    for a, b in zip(cpu.predict(structures), gpu.predict(structures), strict=True):
        assert abs(a.energy - b.energy) < 1e-9 * max(1.0, abs(a.energy))
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-9)
        np.testing.assert_allclose(b.stress, a.stress, atol=1e-10)


def test_reference_water_model_on_cuda(water_model_file, liquid_water):
    from cace_server.model import load_model

    structure = Structure.from_ase(liquid_water)
    cpu = load_model(water_model_file, device="cpu", dtype="float64").predict([structure])[0]
    gpu = load_model(water_model_file, device="cuda", dtype="float64").predict([structure])[0]
    assert abs(cpu.energy - gpu.energy) < 1e-8
    np.testing.assert_allclose(gpu.forces, cpu.forces, atol=1e-8)
    fp32 = load_model(water_model_file, device="cuda", dtype="float32").predict([structure])[0]
    assert abs(cpu.energy - fp32.energy) < 2e-3
    np.testing.assert_allclose(fp32.forces, cpu.forces, atol=2e-3)


def test_training_step_on_cuda(tmp_path):
    from cace_server.train import LabelledStructure, TrainConfig, Trainer

    rng = np.random.default_rng(1)
    teacher = random_model(seed=9, device="cpu")
    data = []
    for i in range(6):
        s = water_box(rng)
        p = teacher.predict([s])[0]
        data.append(LabelledStructure(s, p.energy, p.forces, p.stress, f"box{i}"))
    cfg = TrainConfig(
        output=str(tmp_path / "m.safetensors"),
        cutoff=4.0,
        max_l=2,
        max_nu=2,
        hidden=[8],
        epochs=3,
        device="cuda",
        dtype="float32",
    )
    trainer = Trainer(cfg, data[:4], data[4:], log=lambda _: None)
    before = trainer.validate()["loss"]
    best = trainer.run()
    assert best["valid"]["loss"] < before
