"""Host allocator tuning: model calls reuse their scratch memory instead of faulting it in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="mallopt tuning applies to glibc only",
)

# Faults of a warm call on 384 random atoms at water density, the median of five calls.
# Untuned, glibc maps and unmaps every big scratch tensor: thousands of faults every
# call. Tuned, most calls fault nothing; now and then one faults a few hundred pages
# (Python's own object arenas, which are mmapped by the interpreter, not by malloc),
# which a single measured call would mistake for scratch memory.
_SCRIPT = textwrap.dedent(
    """
    import resource, statistics, sys
    import numpy as np
    from cace_server.model.build import random_model
    from cace_server.structures import Structure

    model = random_model(dtype="float32")
    rng = np.random.default_rng(0)
    n = 384
    box = (n / 0.1) ** (1 / 3)
    s = Structure.create(
        np.where(np.arange(n) % 3 == 0, 8, 1), rng.uniform(0, box, (n, 3)), np.eye(3) * box, True
    )
    p = model.prepare(s)
    for _ in range(3):
        model.predict([p])
    faults = []
    for _ in range(5):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        model.predict([p])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(int(statistics.median(faults)))
    """
)


def _faults(tuning: str) -> int:
    env = {**os.environ, "CACE_SERVER_MALLOC_TUNING": tuning}
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@glibc
def test_a_warm_model_call_does_not_fault_in_its_scratch_memory() -> None:
    untuned = _faults("0")
    tuned = _faults("1")
    assert untuned > 500, f"the untuned baseline should fault ({untuned})"
    assert tuned < untuned / 10, (tuned, untuned)


@glibc
def test_tuning_is_applied_once_and_can_be_turned_off() -> None:
    code = "from cace_server.host_memory import tune_host_allocator as t;print(t(), t())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
    env = {**os.environ, "CACE_SERVER_MALLOC_TUNING": "0"}
    off = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert off.stdout.split() == ["False", "False"]
