"""Limits of the jobs frontend (``POST /v1/jobs``): sizes, concurrency, lifetime."""

from __future__ import annotations

from dataclasses import dataclass

from cace_server.options import option


@dataclass(frozen=True)
class JobSettings:
    """What the server accepts as jobs and how long it keeps them.

    A job over a size limit is refused with 413, one beyond the concurrency limits
    with 429; each names the limit. Jobs live in memory: a restart loses them.
    """

    max_jobs: int = option(16, help="most jobs queued or running at once (429 beyond)")
    max_jobs_per_client: int = option(
        4, help="most jobs one client (bearer token, or address) has queued or running"
    )
    max_running_jobs: int = option(2, help="jobs computed at the same time; others queue")
    max_job_structures: int = option(10_000, help="most structures in one job (413 beyond)")
    max_job_atoms: int = option(1_000_000, help="most atoms, summed over a job's structures")
    max_job_steps: int = option(100_000, help="most optimiser or MD steps a job may ask for")
    job_ttl_s: float = option(
        3600.0, help="a finished job and its results are kept this long (s), then forgotten"
    )
    job_batch_atoms: int | None = option(
        None,
        show="the engine's max_batch_atoms",
        help="most atoms of a job evaluated in one iteration (its live structures)",
    )

    def __post_init__(self) -> None:
        for name in (
            "max_jobs",
            "max_jobs_per_client",
            "max_running_jobs",
            "max_job_structures",
            "max_job_atoms",
            "max_job_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.job_ttl_s > 0:
            raise ValueError(f"job_ttl_s must be positive, got {self.job_ttl_s}")
        if self.job_batch_atoms is not None and self.job_batch_atoms < 1:
            raise ValueError(f"job_batch_atoms must be at least 1, got {self.job_batch_atoms}")
