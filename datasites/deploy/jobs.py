"""The data scientist's own record of her jobs: spec, request ids, checkpoint, receipts.

Kept under ``$FEDSYFT_HOME/jobs/<job id>/`` (default ``~/.fedsyft``), owner-only, so that
``fedsyft train --job ID`` and ``--resume`` work from a new shell or after a crash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from datasites.runtime.site_files import make_private_directory, write_private
from fed_tasks.spec import JobSpec

HOME_ENV = "FEDSYFT_HOME"


def jobs_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".fedsyft").expanduser() / "jobs"


class UnknownJobError(LookupError):
    """A job id this scientist never submitted (from this home)."""


@dataclass(frozen=True)
class JobRecord:
    directory: Path
    spec: JobSpec
    config: str
    requests: dict[str, str]

    @property
    def checkpoint(self) -> Path:
        return self.directory / "checkpoint.json"

    @property
    def receipts(self) -> Path:
        return self.directory / "receipts.jsonl"


def save_job(spec: JobSpec, config: Path, requests: dict[str, str]) -> JobRecord:
    directory = jobs_home() / spec.job_id
    make_private_directory(directory.parent.parent)
    make_private_directory(directory.parent)
    make_private_directory(directory)
    write_private(directory / "job.json", json.dumps(
        {"spec": spec.to_json(), "config": str(config), "requests": requests}, indent=1))
    return JobRecord(directory, spec, str(config), requests)


def load_job(job_id: str) -> JobRecord:
    directory = jobs_home() / job_id
    path = directory / "job.json"
    if not job_id or "/" in job_id or not path.is_file():
        raise UnknownJobError(f"--job {job_id}: no such job in {jobs_home()} (submitted with "
                              f"fedsyft submit; set {HOME_ENV} if it was submitted elsewhere)")
    doc = json.loads(path.read_text())
    return JobRecord(directory, JobSpec.from_json(doc["spec"]), str(doc["config"]),
                     dict(doc["requests"]))
