"""Several devices behind one queue (``--device cpu,cpu`` here; ``cuda:0,cuda:1`` on GPUs)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from cace_server.engine import Engine, EngineSettings
from cace_server.model import random_model
from cace_server.structures import Structure


def box(seed: int, n: int = 24) -> Structure:
    rng = np.random.default_rng(seed)
    grid = np.array([(i, j, k) for i in range(3) for j in range(3) for k in range(3)])[:n]
    positions = grid * 1.6 + rng.uniform(-0.2, 0.2, (n, 3))
    return Structure.create(rng.choice([1, 8], n), positions, np.eye(3) * 4.8, True)


def test_two_workers_share_the_queue_and_agree() -> None:
    model = random_model((1, 8), seed=2, long_range=True)
    structures = [box(k) for k in range(24)]
    # One torch thread for the reference and the workers alike (bit-equal results):
    # other tests' engines may have set any count for this process before.
    torch.set_num_threads(1)
    expected = [model.predict([s])[0] for s in structures]  # as the engine's batches
    # batch_wait_ms=0 and one-structure batches: each batch goes to whichever worker
    # is free, so both work while requests keep arriving.
    settings = EngineSettings(
        device="cpu,cpu", batch_wait_ms=0.0, max_batch_atoms=24, torch_threads=1
    )
    with Engine(model, settings=settings) as engine:
        assert engine.devices == ["cpu#0", "cpu#1"]
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda s: engine.evaluate_sync([s])[0], structures))
        calls = engine.snapshot().model_calls_by_device
    assert set(calls) == {"cpu#0", "cpu#1"} and all(n > 0 for n in calls.values()), calls
    assert sum(calls.values()) == len(structures)
    for g, e in zip(got, expected, strict=True):
        assert g.energy == e.energy
        np.testing.assert_array_equal(g.forces, e.forces)
        np.testing.assert_array_equal(g.stress, e.stress)


def test_device_lists_are_validated() -> None:
    assert EngineSettings(device="cuda:0, cuda:1").devices == ["cuda:0", "cuda:1"]
    with pytest.raises(ValueError, match="comma-separated"):
        EngineSettings(device="cpu,gpu")
