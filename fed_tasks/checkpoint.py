"""The data scientist's checkpoint of a running job, so a job survives a crash or a site
restart (``fedsyft train --resume``).

It keeps only what the orchestrator already saw: the released *sums* (statistics, then one
per round), from which the global model is replayed exactly, and the evidence of the last
aggregate, which the sites need with the next call, and for a secure-sum job the session's
public state (keys, relayed ciphertexts, the masked sum awaiting opening: a round's sum is
released one call later). Written atomically after every round.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fed_tasks.codec import decode_array, encode_array
from fed_tasks.spec import JobSpec

FORMAT = "fedsyft-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to the job, or is unreadable."""


@dataclass
class Checkpoint:
    job_id: str
    fingerprint: str
    released: list[tuple[str, int, np.ndarray]] = field(default_factory=list)
    evidence: dict[str, Any] | None = None
    round_seconds: list[float] = field(default_factory=list)
    session: dict[str, Any] | None = None

    @classmethod
    def new(cls, spec: JobSpec) -> Checkpoint:
        return cls(spec.job_id, spec.fingerprint)

    @property
    def _pending(self) -> tuple[str, int] | None:
        pending = (self.session or {}).get("pending")
        return (str(pending[0]), int(pending[1])) if pending else None

    @property
    def rounds_done(self) -> int:
        """The last round the sites answered (released, or collected and awaiting opening)."""
        pending = self._pending
        done = [r for a, r, _ in self.released if a == "fit"]
        return max([*done, *([pending[1]] if pending and pending[0] == "fit" else [])],
                   default=0)

    def done(self, action: str, rnd: int) -> bool:
        """Whether the sites answered pass ``rnd`` of ``action`` (released, or pending)."""
        return (action, rnd) == self._pending or any(
            (a, r) == (action, rnd) for a, r, _ in self.released)

    @property
    def has_stats(self) -> bool:
        pending = self._pending
        return any(a == "stats" for a, _, _ in self.released) or bool(
            pending and pending[0] == "stats")

    def save(self, path: Path) -> None:
        doc = {"format": FORMAT, "job_id": self.job_id, "fingerprint": self.fingerprint,
               "released": [{"action": a, "round": r, "sum": encode_array(v)}
                            for a, r, v in self.released],
               "evidence": self.evidence, "round_seconds": self.round_seconds,
               "session": self.session}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".checkpoint-")
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, spec: JobSpec) -> Checkpoint:
        try:
            doc = json.loads(Path(path).read_text())
            if doc.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a {FORMAT} file")
            released = [(str(e["action"]), int(e["round"]), decode_array(e["sum"]))
                        for e in doc["released"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"checkpoint {path} is unreadable: {exc}") from None
        if doc.get("job_id") != spec.job_id or doc.get("fingerprint") != spec.fingerprint:
            raise CheckpointError(f"checkpoint {path} belongs to job {doc.get('job_id')!r}, "
                                  f"not to job {spec.job_id!r}")
        session = doc.get("session")
        if session is not None and not isinstance(session, dict):
            raise CheckpointError(f"checkpoint {path} is unreadable: bad secure-sum session")
        return cls(spec.job_id, spec.fingerprint, released, doc.get("evidence"),
                   [float(s) for s in doc.get("round_seconds") or []], session)
