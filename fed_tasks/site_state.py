"""The federation's model as one site has verified it: the only model a site trains or scores.

Why: a data scientist who chooses the weights a site trains from can build a first layer
whose update holds training rows verbatim, even inside a secure sum (Fowl et al., ICLR 2022),
or hand one site a null model so that a "sum" is one site alone (Pasquini et al., CCS 2022).
So a site builds the initial model from the approved spec itself and, from then on, moves
it only by aggregates it has checked (:mod:`datasites.runtime.aggregate_check`), with the same rule
the orchestrator uses (:class:`fed_tasks.global_state.GlobalState`).

Each state carries a chain digest ``H(previous digest, action, slot, sha256(sum))`` that
names the model exactly. Every contribution is signed together with the digest of the model
it was computed from, and every party that sums contributions checks that they all agree,
so sites that were shown different histories can never be summed together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fed_tasks.codec import PayloadError, decode_array, encode_array
from fed_tasks.dp_step import CLIP_KEY
from fed_tasks.global_state import GlobalState
from fed_tasks.preprocessing import Standardizer
from fed_tasks.schedule import may_follow, slot_index, vector_length
from fed_tasks.spec import JobSpec
from fed_tasks.strategies import strategy_for


class ModelStateError(PayloadError):
    """A call does not fit the site's verified history of the job (replay, skip, mismatch)."""


def _h(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def sum_digest(summed: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(summed, dtype="<f8").tobytes()).hexdigest()


def _finite(state: GlobalState) -> bool:
    """Every number of the model is finite (what the site saves must load again)."""
    arrays = [state.weights, *state.extra.values(), *state.server.values()]
    return all(np.all(np.isfinite(a)) for a in arrays)


def initial_digest(spec: JobSpec, weights: np.ndarray) -> str:
    return _h("init", spec.fingerprint, sum_digest(weights))


def aggregate_index(spec: JobSpec, action: str, rnd: int) -> int:
    """The slot of pass ``rnd`` of ``action`` (:mod:`fed_tasks.schedule`): the order
    aggregates are applied in (0 the statistics, r training round r of an autoencoder)."""
    return slot_index(spec, action, rnd)


def _extra_length(spec: JobSpec, key: str) -> int | None:
    """A kept sum's length; None for pooled trees, whose length is the contributors'."""
    action = key.split(":")[0]
    return None if action == "trees" else vector_length(spec, action)


def _arrays(raw: dict, name: str, length: Callable[[str], int | None]) -> dict[str, np.ndarray]:
    """A saved group of named arrays, each decoded with its expected length."""
    return {k: decode_array(v, length(k)) for k, v in dict(raw.get(name) or {}).items()}


def _encoded(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: encode_array(v) for k, v in arrays.items()}


@dataclass
class SiteModelState:
    """One job's model at one site, persisted in the site directory (``path``) if given."""

    spec: JobSpec
    state: GlobalState
    digest: str
    applied: int = -1  # aggregate index last applied (-1: none yet)
    trained: int = 0  # slot of the last summed call this site computed (with ``reply``)
    reply: dict | None = None  # the last such reply; a retry gets exactly it again
    # what only this site knows and keeps between rounds (SCAFFOLD's control variate):
    # never released, not part of the digest
    private: dict[str, np.ndarray] = field(default_factory=dict)
    path: Path | None = field(default=None, repr=False)
    # buffered rounds (fed_tasks/buffered.py): the digests of the last few models this site
    # held (aggregate index -> digest), which a stale contribution must have been computed
    # from, and each member's last slot already applied, so no update counts twice
    past: dict[int, str] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    # a buffered secure-sum job: this site's last training update until an aggregate holds
    # it ({"slot", "vector"}); a late one is masked again into a later round (never sent
    # in clear, kept 0600 with the rest)
    pending: dict | None = None

    @classmethod
    def initial(cls, spec: JobSpec, weights: np.ndarray, path: Path | None = None
                ) -> SiteModelState:
        return cls(spec, GlobalState(np.asarray(weights, dtype=np.float64)),
                   initial_digest(spec, weights), path=path)

    @classmethod
    def load(cls, spec: JobSpec, weights: np.ndarray, path: Path) -> SiteModelState:
        """The saved state of the job, or its initial state if the site has none yet."""
        if not path.exists():
            return cls.initial(spec, weights, path)
        try:
            raw = json.loads(path.read_text())
            if raw["job_id"] != spec.job_id or raw["spec"] != spec.fingerprint:
                raise ModelStateError(f"{path.name} belongs to another job spec")
            norm = raw.get("norm")
            state = GlobalState(decode_array(raw["weights"], len(weights)),
                                Standardizer.from_dict(norm) if norm else None,
                                float(raw.get("loss", "nan")),
                                _arrays(raw, "extra", lambda k: _extra_length(spec, k)),
                                _arrays(raw, "server", lambda k: 1 if k == CLIP_KEY
                                        else len(weights)))
            return cls(spec, state, str(raw["digest"]), int(raw["applied"]),
                       int(raw["trained"]), raw.get("reply"),
                       _arrays(raw, "private", lambda _: len(weights)), path,
                       {int(k): str(v) for k, v in dict(raw.get("past") or {}).items()},
                       {str(k): int(v) for k, v in dict(raw.get("used") or {}).items()},
                       raw.get("pending"))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ModelStateError(f"model state file {path.name} is unreadable: "
                                  f"{type(exc).__name__}") from None

    def save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({
            "job_id": self.spec.job_id, "spec": self.spec.fingerprint, "digest": self.digest,
            "applied": self.applied, "trained": self.trained, "reply": self.reply,
            "weights": encode_array(self.state.weights), "loss": repr(self.state.loss),
            "norm": self.state.norm.to_dict() if self.state.norm is not None else None,
            "extra": _encoded(self.state.extra), "server": _encoded(self.state.server),
            "private": _encoded(self.private), "past": self.past, "used": self.used,
            "pending": self.pending})
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # ---- the history ------------------------------------------------------------------
    def expects(self, index: int) -> bool:
        """True if the aggregate ``index`` is the next one this site must apply."""
        return may_follow(self.spec, self.applied, index)

    def apply(self, action: str, rnd: int, summed: np.ndarray) -> None:
        """Move the model by one *verified* aggregate, in order."""
        index = aggregate_index(self.spec, action, rnd)
        if not self.expects(index):
            raise ModelStateError(f"aggregate {action} round {rnd} is not the next one for this "
                                  f"site (it holds the model after aggregate {self.applied})")
        # a sum that would wreck the model is refused whole: advance on a trial state (it
        # only reassigns arrays and dict entries, so copies of the dicts are enough)
        trial = dataclasses.replace(self.state, extra=dict(self.state.extra),
                                    server=dict(self.state.server))
        trial.advance(action, summed, strategy_for(self.spec), rnd=rnd)
        if not _finite(trial):
            raise ModelStateError(f"aggregate {action} round {rnd} would make this site's model "
                                  "non-finite (an overflowing or cancelling update): refused")
        self.state = trial
        self.digest = _h(self.digest, action, str(index), sum_digest(summed))
        self.applied = index
        if self.spec.async_k is not None:  # what a stale contribution may be computed from
            self.past[index] = self.digest
            keep = index - self.spec.max_staleness - 1
            self.past = {i: d for i, d in self.past.items() if i >= keep}

    def model_before(self, slot: int) -> str | None:
        """The digest of the model this site held right before computing ``slot`` (the
        model after aggregate ``slot − 1``), if it is recent enough to be kept."""
        if slot - 1 == self.applied:
            return self.digest
        return self.past.get(slot - 1)

    def check_slot(self, index: int) -> bool:
        """Whether summed call ``index`` may be computed now (after the call's evidence was
        applied); True means "answer with the saved reply".

        Slots strictly increase: a replayed call is refused, and so is one whose previous
        aggregate the site does not hold (how many calls the job may make is the site
        guard's count). A site may have computed no contribution to some aggregates it
        holds (it was not selected, or answered too late): it still computes each slot at
        most once, always from the verified model right before it. The one exception is an
        exact retry of the last call, which gets the very reply it got before (the site
        computes nothing new, so a retry reveals nothing new).
        """
        if index == self.trained and self.reply is not None:
            return True
        first = index == 0 and self.reply is None
        if not first and (index <= self.trained or not may_follow(self.spec, self.applied,
                                                                  index)):
            raise ModelStateError(f"aggregate {index} is out of order: this site computed "
                                  f"aggregate {self.trained} last and holds the model after "
                                  f"aggregate {self.applied} (slots strictly increase, each "
                                  "from the aggregate right before it)")
        return False

    def record_trained(self, index: int, reply: dict) -> None:
        self.trained, self.reply = index, reply
