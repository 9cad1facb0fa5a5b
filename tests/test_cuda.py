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


@pytest.mark.parametrize("stack", [True, False], ids=["member-axis", "member-loop"])
def test_committee_on_cuda_equals_cpu_float64(stack: bool):
    """The committee's shared pass on the device (member axis, the GPU default, and
    the member loop): every member's energy, forces and virial as on the CPU."""
    from cace_server.model.committee import Committee

    rng = np.random.default_rng(2)
    structures = [water_box(rng), water_box(rng, 30, 9.0)]
    outputs = ["energy", "forces", "stress", "committee_forces", "committee_virials"]
    cpu = Committee([random_model(seed=s, cutoff=4.0) for s in (1, 2, 3)])
    gpu = Committee([random_model(seed=s, cutoff=4.0, device="cuda") for s in (1, 2, 3)])
    assert gpu.shared is not None
    gpu.shared.stack = stack
    for a, b in zip(
        cpu.predict(structures, outputs), gpu.predict(structures, outputs), strict=True
    ):
        assert abs(a.energy - b.energy) < 1e-9 * max(1.0, abs(a.energy))
        np.testing.assert_allclose(b.committee_forces, a.committee_forces, atol=1e-9)
        np.testing.assert_allclose(b.committee_virials, a.committee_virials, atol=1e-9)
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


def test_neighbour_lists_built_on_the_device_equal_host_lists():
    from cace_server.model.neighbors import prepare_structure

    rng = np.random.default_rng(2)
    model = random_model(seed=4, long_range=True, device="cuda")
    structures = [water_box(rng), water_box(rng, 30, 9.0)]
    on_device = [model.prepare(s) for s in structures]
    assert all(p.receivers.device.type == "cuda" for p in on_device)
    host = [prepare_structure(s, model.elements, model.cutoff) for s in structures]

    def pairs(p):
        columns = [np.asarray(torch.as_tensor(a).cpu()) for a in (p.receivers, p.senders)]
        shifts = np.asarray(torch.as_tensor(p.unit_shifts).cpu())
        return sorted(map(tuple, np.column_stack([*columns, shifts]).tolist()))

    for d, h in zip(on_device, host, strict=True):
        assert pairs(d) == pairs(h)
    for a, b in zip(model.predict(on_device), model.predict(host), strict=True):
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-10)


def test_verlet_sessions_on_cuda_equal_fresh_lists():
    from cace_server.engine import Engine, EngineSettings

    rng = np.random.default_rng(3)
    model = random_model(seed=4, long_range=True, device="cpu")
    s = water_box(rng)
    settings = EngineSettings(device="cuda", dtype="float64", neighbor_skin=0.5)
    with Engine(model, settings=settings) as engine:
        for _ in range(4):
            s = Structure.create(s.numbers, s.positions + rng.normal(0, 0.01, (len(s), 3)),
                                 s.cell, s.pbc)  # fmt: skip
            got = engine.evaluate_sync([s], trajectory="md")[0]
            want = random_model(seed=4, long_range=True, device="cpu").predict([s])[0]
            np.testing.assert_allclose(got.forces, want.forces, atol=1e-9)
        assert engine.snapshot().neighbor_lists_reused == 3


def test_a_real_device_side_assert_is_fatal(tmp_path):
    """A kernel that asserts poisons the CUDA context: run in a child process."""
    import subprocess
    import sys

    script = """
import numpy as np, torch
from cace_server.engine import Engine, EngineSettings, DeviceFailed
from cace_server.engine.models import ModelWrapper
from cace_server.model.build import random_model
from cace_server.structures import Structure

class Asserting(ModelWrapper):
    def __init__(self, model):
        super().__init__(model)
        self.armed = False
    def predict(self, structures, outputs):
        if self.armed:  # an index out of bounds inside a kernel: CUDA asserts
            x = torch.zeros(4, device="cuda")
            x[torch.tensor([10], device="cuda")] += 1.0
        return self.inner.predict(structures, outputs)

model = Asserting(random_model(seed=1, device="cuda"))
rng = np.random.default_rng(0)
s = Structure.create(np.tile([8, 1, 1], 8), rng.uniform(0, 8, (24, 3)), np.eye(3) * 8, True)
with Engine(model, settings=EngineSettings(device="cuda")) as engine:
    model.armed = True
    try:
        engine.evaluate_sync([s])
    except DeviceFailed as exc:
        print("FATAL", exc)
    print("HEALTHY", engine.healthy)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert "FATAL" in proc.stdout and "HEALTHY False" in proc.stdout, proc.stdout + proc.stderr


# -- the compiled call on CUDA (cace_server/model/compiled.py) ---------------------------


def _compiled(model, mode: str):
    from cace_server.model.compiled import compile_model

    (call,) = compile_model(model, mode)
    return call


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("long_range", [False, True], ids=["short", "long-range"])
def test_compiled_equals_eager_on_cuda_float64(mode: str, long_range: bool):
    """Triton kernels (CUDA graphs in reduce-overhead mode) give the eager numbers."""
    rng = np.random.default_rng(5)
    structures = [water_box(rng), water_box(rng, 30, 9.0)]
    eager = random_model(seed=4, long_range=long_range, device="cuda")
    model = random_model(seed=4, long_range=long_range, device="cuda")
    call = _compiled(model, mode)
    for a, b in zip(eager.predict(structures), model.predict(structures), strict=True):
        assert abs(a.energy - b.energy) < 1e-10 * max(1.0, abs(a.energy))
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-10)
        np.testing.assert_allclose(b.stress, a.stress, atol=1e-10)
    assert call.stats.compiles == 1 and call.stats.fallbacks == 0 and call.stats.eager_calls == 0


def test_compiled_reference_water_model_on_cuda_float32(water_model_file, liquid_water):
    """The reference model compiled in reduce-overhead mode, float32: the eager float32
    numbers within float32's tolerance; a second call of the same shape (the same
    structure, then one whose atoms moved a little) compiles nothing."""
    from cace_server.model import load_model

    structure = Structure.from_ase(liquid_water)
    eager = load_model(water_model_file, device="cuda", dtype="float32")
    model = load_model(water_model_file, device="cuda", dtype="float32")
    call = _compiled(model, "reduce-overhead")
    want, got = eager.predict([structure])[0], model.predict([structure])[0]
    assert abs(want.energy - got.energy) < 2e-3
    np.testing.assert_allclose(got.forces, want.forces, atol=2e-3)
    np.testing.assert_allclose(got.stress, want.stress, atol=1e-4)
    assert call.stats.compiles == 1

    rng = np.random.default_rng(6)
    moved = Structure.create(
        structure.numbers,
        structure.positions + rng.normal(0, 0.01, structure.positions.shape),
        structure.cell,
        structure.pbc,
    )
    for s in (structure, moved):
        want, got = eager.predict([s])[0], model.predict([s])[0]
        np.testing.assert_allclose(got.forces, want.forces, atol=2e-3)
    stats = call.stats
    assert (stats.compiles, stats.calls, stats.eager_calls, stats.fallbacks) == (1, 3, 0, 0)
