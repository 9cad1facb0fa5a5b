"""Jobs: batched relaxations and short MD runs computed on the server.

``JobManager`` admits and runs them (``manager.py``); each job steps ASE's own
optimisers or integrators for all of its structures in lockstep, one engine call per
iteration (``lockstep.py``); ``relax.py`` and ``md.py`` say what one structure runs;
``params.py`` what a job may ask for.
"""

from cace_server.jobs.items import JobItem
from cace_server.jobs.manager import (
    Job,
    JobManager,
    JobRefused,
    JobRequest,
    JobsSnapshot,
    JobState,
    UnknownJob,
)
from cace_server.jobs.params import OPTIMIZER_ARGS, JobKind, MDParams, RelaxParams
from cace_server.jobs.settings import JobSettings

__all__ = [
    "OPTIMIZER_ARGS",
    "Job",
    "JobItem",
    "JobKind",
    "JobManager",
    "JobRefused",
    "JobRequest",
    "JobSettings",
    "JobState",
    "JobsSnapshot",
    "MDParams",
    "RelaxParams",
    "UnknownJob",
]
