"""Server-side jobs (``cace_server.jobs``) against ASE run the usual way.

A job steps ASE's own optimisers and integrators for all its structures in lockstep,
one engine call per iteration. The reference is ASE's run of the same optimiser on
the same structure with the model as an in-process calculator: step counts and
positions must agree (float64), and the job must make one model call per iteration.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import pytest
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixAtoms, FixCom
from ase.filters import FrechetCellFilter
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import FIRE, LBFGS

from cace_server.calculator import CACECalculator
from cace_server.engine import Engine, EngineSettings, LaneTiming
from cace_server.jobs import (
    JobItem,
    JobManager,
    JobRefused,
    JobRequest,
    JobSettings,
    MDParams,
    RelaxParams,
)
from cace_server.jobs.lockstep import Lockstep, LockstepCalculator, Task
from cace_server.jobs.md import draw_velocities, structure_rng
from cace_server.model import load_model
from scripts.water_clusters import water_boxes, water_clusters

WATER = "cace_server/data/water.safetensors"

pytestmark = pytest.mark.filterwarnings("ignore:logm result may be inaccurate")


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with Engine(WATER, settings=EngineSettings(dtype="float64")) as engine:
        yield engine


@pytest.fixture(scope="module")
def manager(engine: Engine) -> Iterator[JobManager]:
    manager = JobManager(engine, JobSettings(max_jobs_per_client=16))
    yield manager
    manager.close()


@pytest.fixture(scope="module")
def calculator() -> CACECalculator:
    return CACECalculator(WATER, dtype="float64")


def run_job(manager: JobManager, kind: str, images: list[Atoms], params: Any) -> Any:
    job = manager.submit(JobRequest(kind, [JobItem.from_ase(a) for a in images], params))  # type: ignore[arg-type]
    assert job.wait(300), job.status()
    assert job.state == "done", job.status()
    records, _ = job.records()
    return job, sorted(records, key=lambda r: r["index"])


def ase_relax(atoms: Atoms, calc: Any, optimizer: type, fmax: float, steps: int, **kw: Any) -> Any:
    atoms = atoms.copy()
    atoms.calc = calc
    target = (
        FrechetCellFilter(atoms, scalar_pressure=kw.pop("pressure")) if "pressure" in kw else atoms
    )
    opt = optimizer(target, logfile=None, **kw)
    converged = opt.run(fmax=fmax, steps=steps)
    return atoms, opt.nsteps, converged


class Perturbed(Calculator):
    """The model's forces times (1 + eps N(0, 1)): rounding noise, made visible."""

    implemented_properties: ClassVar[list[str]] = ["energy", "free_energy", "forces"]

    def __init__(self, calc: Calculator, eps: float, seed: int) -> None:
        super().__init__()
        self.calc, self.eps, self.rng = calc, eps, np.random.default_rng(seed)

    def calculate(
        self, atoms: Any = None, properties: Any = None, changes: Any = all_changes
    ) -> None:
        super().calculate(atoms, properties, changes)
        atoms = self.atoms.copy()
        atoms.calc = self.calc
        forces = atoms.get_forces()
        noise = 1 + self.eps * self.rng.standard_normal(forces.shape)
        energy = atoms.get_potential_energy()
        self.results = {"energy": energy, "free_energy": energy, "forces": forces * noise}


def test_a_fire_job_equals_ases_run_structure_by_structure(
    manager: JobManager, calculator: CACECalculator
) -> None:
    clusters = water_clusters(6, seed=3, smallest=2, largest=5)
    job, records = run_job(manager, "relax", clusters, RelaxParams(fmax=0.05, steps=400))
    longest = 0
    for cluster, record in zip(clusters, records, strict=True):
        atoms, nsteps, converged = ase_relax(cluster, calculator, FIRE, 0.05, 400)
        assert record["steps"] == nsteps
        assert record["converged"] == converged
        np.testing.assert_allclose(record["positions"], atoms.positions, rtol=0, atol=1e-6)
        assert abs(record["energy"] - atoms.get_potential_energy()) < 1e-8
        longest = max(longest, nsteps)
    # one engine call per iteration, iterations = the longest relaxation (+ its first call)
    status = job.status()
    assert status["model_calls"] == status["iterations"] == longest + 1


def lbfgs_agreement(
    clusters: list[Atoms], records: list[dict[str, Any]], calculator: Any, steps: int
) -> int:
    """Check LBFGS job records against ASE's runs; returns how many clusters ASE itself
    reproduces under rounding noise (those the job must match exactly).

    LBFGS on floppy clusters amplifies the last bit: a batch of structures rounds
    differently from one structure (~4e-16 eV/Å), and ASE's own run, given forces
    perturbed by 1e-15 relative, can end 1e-3 Å or a whole local minimum away. Where
    ASE's run is reproducible under that noise, the job must equal it (1e-6 Å, steps
    within 1); where it is not, the job must still converge when ASE does, to fmax.
    """
    stable = 0
    for cluster, record in zip(clusters, records, strict=True):
        atoms, nsteps, converged = ase_relax(cluster, calculator, LBFGS, 0.05, steps)
        assert record["converged"] == converged
        if converged:
            assert record["fmax"] < 0.05
        noisy = [
            ase_relax(cluster, Perturbed(calculator, 1e-15, seed), LBFGS, 0.05, steps)
            for seed in (1, 2)
        ]
        spread = max(float(np.abs(a.positions - atoms.positions).max()) for a, _, _ in noisy)
        if spread <= 1e-7 and all(n == nsteps for _, n, _ in noisy):
            stable += 1
            assert record["steps"] == nsteps
            np.testing.assert_allclose(record["positions"], atoms.positions, rtol=0, atol=1e-6)
    return stable


def test_an_lbfgs_job_equals_ases_run_wherever_ase_is_reproducible(
    manager: JobManager, calculator: CACECalculator
) -> None:
    clusters = water_clusters(4, seed=3, smallest=2, largest=5)
    _, records = run_job(manager, "relax", clusters, RelaxParams(optimizer="LBFGS", steps=400))
    assert lbfgs_agreement(clusters, records, calculator, 400) >= 2


def test_a_cell_relaxation_under_pressure_equals_ases(
    manager: JobManager, calculator: CACECalculator
) -> None:
    boxes = water_boxes(2, 8, seed=4)
    pressure = 1.0 * units.GPa
    params = RelaxParams(fmax=0.1, steps=25, cell=True, scalar_pressure=pressure)
    _, records = run_job(manager, "relax", boxes, params)
    for box, record in zip(boxes, records, strict=True):
        atoms, nsteps, _ = ase_relax(box, calculator, FIRE, 0.1, 25, pressure=pressure)
        assert record["steps"] == nsteps
        np.testing.assert_allclose(record["cell"], atoms.cell.array, rtol=0, atol=1e-6)
        np.testing.assert_allclose(record["positions"], atoms.positions, rtol=0, atol=1e-6)
        np.testing.assert_allclose(record["stress"], atoms.get_stress(), rtol=0, atol=1e-9)
    assert not np.allclose(records[0]["cell"], boxes[0].cell.array)  # the cell did move


def test_fixed_atoms_stay_and_do_not_count_for_fmax(manager: JobManager) -> None:
    cluster = water_clusters(1, seed=5, smallest=4, largest=4)[0]
    cluster.set_constraint(FixAtoms(indices=[0, 3]))
    _, (record,) = run_job(manager, "relax", [cluster], RelaxParams(fmax=0.05, steps=300))
    np.testing.assert_array_equal(record["positions"][[0, 3]], cluster.positions[[0, 3]])
    free = np.linalg.norm(record["forces"], axis=1)
    free[[0, 3]] = 0.0
    assert record["fmax"] == pytest.approx(free.max())


def md_images(count: int, molecules: int, seed: int) -> list[Atoms]:
    boxes = water_boxes(count, molecules, seed=seed)
    rng = np.random.default_rng(seed)
    for box in boxes:
        draw_velocities(box, 300, rng)
        Stationary(box)
    return boxes


def test_an_nve_job_follows_ases_velocity_verlet(
    manager: JobManager, calculator: CACECalculator
) -> None:
    boxes = md_images(2, 8, seed=6)
    params = MDParams(timestep_fs=0.5, steps=20, stride=5, frame_fields=["positions", "velocities"])
    job, records = run_job(manager, "md", boxes, params)
    assert job.status()["model_calls"] == 21  # the first forces, then one call per step
    for box, record in zip(boxes, records, strict=True):
        atoms = box.copy()
        atoms.set_velocities(box.get_velocities())
        atoms.calc = calculator
        frames: list[tuple[np.ndarray, float]] = []

        def keep(a: Atoms = atoms, kept: list[tuple[np.ndarray, float]] = frames) -> None:
            kept.append((a.positions.copy(), a.get_total_energy()))

        dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs, logfile=None)
        dyn.attach(keep, interval=5)
        dyn.run(20)
        assert [f["step"] for f in record["frames"]] == [0, 5, 10, 15, 20]
        for frame, (positions, total) in zip(record["frames"], frames, strict=True):
            np.testing.assert_allclose(frame["positions"], positions, rtol=0, atol=1e-8)
            assert frame["energy"] + frame["kinetic_energy"] == pytest.approx(total, abs=1e-8)
        np.testing.assert_allclose(
            record["velocities"], atoms.get_velocities() * units.fs, rtol=0, atol=1e-10
        )


def test_langevin_draws_its_noise_per_structure_from_the_seed(
    manager: JobManager, calculator: CACECalculator
) -> None:
    boxes = water_boxes(2, 8, seed=7)
    params = MDParams(
        integrator="langevin", temperature_K=300, steps=10, stride=10, seed=42, timestep_fs=0.5
    )
    _, first = run_job(manager, "md", boxes, params)
    _, again = run_job(manager, "md", boxes, params)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["positions"], b["positions"])
    # ASE's Langevin with the structure's generator: the same run
    atoms = boxes[1].copy()
    rng = structure_rng(params, 1)
    draw_velocities(atoms, 300, rng)
    Stationary(atoms)
    atoms.calc = calculator
    atoms.set_constraint(FixCom())
    Langevin(
        atoms,
        0.5 * units.fs,
        temperature_K=300,
        friction=0.01 / units.fs,
        fixcm=False,
        rng=rng,
        logfile=None,
    ).run(10)
    np.testing.assert_allclose(first[1]["positions"], atoms.positions, rtol=0, atol=1e-8)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_one_atom_with_its_centre_fixed_has_no_temperature(manager: JobManager) -> None:
    # Langevin with fix_com leaves a lone atom no degree of freedom: the temperature is
    # undefined (null), not ASE's 0/0
    atom = Atoms("O", positions=[[0.0, 0.0, 0.0]])
    params = MDParams(integrator="langevin", temperature_K=300, steps=2, stride=1)
    _, (record,) = run_job(manager, "md", [atom], params)
    assert record["status"] == "done", record
    assert record["temperature_K"] is None
    assert [f["temperature_K"] for f in record["frames"]] == [None, None, None]
    # without the constraint its 3 degrees of freedom have a temperature
    params = MDParams(integrator="langevin", temperature_K=300, steps=2, stride=1, fix_com=False)
    _, (record,) = run_job(manager, "md", [atom], params)
    assert record["temperature_K"] > 0


def test_the_live_set_follows_the_budget_and_refills(engine: Engine) -> None:
    """Structures leave when done and waiting ones enter; no iteration exceeds the budget."""
    model = load_model(WATER, dtype="float64")
    sizes: list[int] = []

    def evaluate(structures: list[Any], slots: list[int]) -> list[Any]:
        sizes.append(sum(len(s) for s in structures))
        return model.predict(structures, outputs=("energy", "forces"))

    clusters = water_clusters(6, seed=8, smallest=2, largest=4)
    params = RelaxParams(fmax=0.05, steps=300)
    from cace_server.jobs.relax import relax_body

    tasks = [
        Task(i, len(a), relax_body(JobItem.from_ase(a), params), LockstepCalculator())
        for i, a in enumerate(clusters)
    ]
    loop = Lockstep(evaluate, max_atoms=30, max_pairs=10**9)
    done = dict(loop.run(tasks))
    assert sorted(done) == list(range(6)) and all(r["status"] != "failed" for r in done.values())
    assert max(sizes) <= 30
    assert len(set(sizes)) > 2  # the set changed as structures finished and others entered


def test_a_structure_that_cannot_be_evaluated_fails_alone(manager: JobManager) -> None:
    good = water_clusters(1, seed=9, smallest=2, largest=2)[0]
    carbon = good.copy()
    carbon.numbers[0] = 6  # the water model knows H and O only
    job = manager.submit(
        JobRequest(
            "relax", [JobItem.from_ase(good), JobItem.from_ase(carbon)], RelaxParams(steps=20)
        )
    )
    assert job.wait(60) and job.state == "done"
    records = {r["index"]: r for r in job.records()[0]}
    assert records[0]["status"] in ("converged", "not_converged")
    assert records[1]["status"] == "failed"
    assert "6" in records[1]["error"]["message"] or "element" in records[1]["error"]["message"]


def test_cancel_stops_a_job_and_withdraws_its_work(engine: Engine) -> None:
    manager = JobManager(engine)
    try:
        clusters = water_clusters(8, seed=10, smallest=10, largest=20)
        job = manager.submit(
            JobRequest("relax", [JobItem.from_ase(a) for a in clusters], RelaxParams(steps=5000))
        )
        deadline = time.monotonic() + 30
        while job.status()["iterations"] < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        t0 = time.monotonic()
        job.cancel()
        assert job.wait(10)
        assert job.state == "cancelled"
        assert time.monotonic() - t0 < 5
        assert engine.snapshot().queue_depth == 0
    finally:
        manager.close()


def test_limits_refuse_with_the_reason(engine: Engine) -> None:
    settings = JobSettings(
        max_jobs=2, max_jobs_per_client=1, max_job_structures=3, max_job_atoms=40, max_job_steps=100
    )
    manager = JobManager(engine, settings)
    small = [JobItem.from_ase(a) for a in water_clusters(2, seed=11, smallest=2, largest=2)]
    try:
        with pytest.raises(JobRefused, match="max_job_structures") as info:
            manager.submit(JobRequest("relax", small * 2, RelaxParams()))
        assert info.value.status == 413
        with pytest.raises(JobRefused, match="max_job_atoms"):
            big = [JobItem.from_ase(water_clusters(1, seed=1, smallest=15, largest=15)[0])]
            manager.submit(JobRequest("relax", big, RelaxParams()))
        with pytest.raises(JobRefused, match="max_job_steps"):
            manager.submit(JobRequest("relax", small, RelaxParams(steps=101)))
        gate = threading.Event()
        long = RelaxParams(steps=100, fmax=1e-9)
        first = manager.submit(JobRequest("relax", small, long), owner="a")
        with pytest.raises(JobRefused, match="max_jobs_per_client") as info:
            manager.submit(JobRequest("relax", small, long), owner="a")
        assert info.value.status == 429
        second = manager.submit(JobRequest("relax", small, long), owner="b")
        with pytest.raises(JobRefused, match="max_jobs"):
            manager.submit(JobRequest("relax", small, long), owner="c")
        gate.set()
        for job in (first, second):
            job.cancel()
            assert job.wait(30)
    finally:
        manager.close()


def test_a_capped_job_evaluates_its_structures_in_turns_with_the_same_results() -> None:
    """While i-PI shares the device a job iteration may take part of the live set; each
    structure's run is unchanged, and no structure is left behind."""
    model = load_model(WATER, dtype="float64")
    clusters = water_clusters(5, seed=12, smallest=2, largest=4)
    params = RelaxParams(fmax=0.05, steps=200)
    from cace_server.jobs.relax import relax_body

    def run(cap: int | None) -> tuple[dict[int, dict[str, Any]], list[int]]:
        sizes: list[int] = []

        def evaluate(structures: list[Any], slots: list[int]) -> list[Any]:
            sizes.append(sum(len(s) for s in structures))
            return model.predict(structures, outputs=("energy", "forces"))

        tasks = [
            Task(i, len(a), relax_body(JobItem.from_ase(a), params), LockstepCalculator())
            for i, a in enumerate(clusters)
        ]
        limit = (lambda: cap) if cap is not None else None
        loop = Lockstep(evaluate, max_atoms=10_000, max_pairs=10**9, cap=limit)
        return dict(loop.run(tasks)), sizes

    whole, whole_sizes = run(None)
    turns, turn_sizes = run(20)
    assert max(turn_sizes) <= 20 < max(whole_sizes)
    assert len(turn_sizes) > len(whole_sizes)
    for i in range(len(clusters)):
        assert turns[i]["steps"] == whole[i]["steps"]
        np.testing.assert_allclose(turns[i]["positions"], whole[i]["positions"], atol=1e-9)


def test_a_job_beside_an_ipi_run_holds_its_batch_to_an_ipi_batchs_length(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = JobManager(engine)
    try:
        now = time.monotonic()
        idle = {"jobs": LaneTiming(now, 0.2, 1e-4)}
        monkeypatch.setattr(engine, "lane_timing", lambda: idle)
        assert manager._cap(8192) == 8192  # no i-PI run: the whole budget
        busy = {**idle, "ipi": LaneTiming(now, 0.05, 5e-4)}
        monkeypatch.setattr(engine, "lane_timing", lambda: busy)
        assert manager._cap(8192) == 1024  # 0.05 s / 1e-4 s per atom = 500, floor 8192/8
        busy["ipi"] = LaneTiming(now, 0.4, 5e-4)
        assert manager._cap(8192) == 4000
        busy["ipi"] = LaneTiming(now - 10, 0.4, 5e-4)  # the i-PI run has ended
        assert manager._cap(8192) == 8192
    finally:
        manager.close()


def test_lane_timing_keeps_moving_averages() -> None:
    t = LaneTiming().updated(1.0, 0.1, 100)
    assert (t.last_end, t.batch_s, t.s_per_atom) == (1.0, 0.1, 0.001)
    t = t.updated(2.0, 0.2, 100)
    assert t.last_end == 2.0
    assert t.batch_s == pytest.approx(0.13) and t.s_per_atom == pytest.approx(0.0013)
