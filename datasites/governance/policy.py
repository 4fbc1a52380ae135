"""What a data owner allows on a dataset; the site checks it at approval and at every call.

The policy lives in the site directory (``policy.json``, replaced atomically) beside the
privacy ledger. The data scientist reads it in plain words in the dataset's description
(see :meth:`DatasetPolicy.plain_words`), which the site rewrites whenever the policy changes.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from datasites.governance.ledger import write_json_atomic
from fed_tasks import dp_usefulness
from fed_tasks.detectors import REGISTRY
from fed_tasks.dp_usefulness import USEFUL_RATIO
from fed_tasks.spec import ROW_DP_MODELS, JobSpec

DATASET_NAME = "records"  # the one dataset each fedsyft site publishes
POLICY_FILE = "policy.json"
_POLICY_JSON = re.compile(r"^policy-json: (\{.*\})\s*$", re.MULTILINE)


class PolicyError(ValueError):
    """A policy (or a change to it) is invalid, or its file cannot be read."""


class Submitter(BaseModel):
    """One allowed submitter: the e-mail the owner named, bound to that syft account's id.

    Why: a syft user can change her own e-mail (``client.account.set_email``), so an e-mail
    says nothing about who submitted. ``user_id`` is the account's verify key (hex), which
    signs every request that user makes; the site resolves it from the e-mail when the owner
    sets the policy. An unbound entry (no account had that e-mail then) matches nobody.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    email: str
    user_id: str | None = None

    @field_validator("email")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.strip().lower()

    def words(self) -> str:
        bound = f"syft user {self.user_id[:12]}…" if self.user_id else \
            "no account at this site when the policy was set: matches nobody"
        return f"{self.email} ({bound})"


@dataclass(frozen=True)
class Requester:
    """Who made a request: the verify key that signed it (what the policy compares) and the
    e-mail the site knows the account by (for messages only)."""

    user_id: str
    email: str = ""

    def words(self) -> str:
        return f"{self.email} (syft user {self.user_id[:12]}…)" if self.email else self.user_id


class DatasetPolicy(BaseModel):
    """The data owner's rules for one dataset. Defaults are permissive enough for the demo."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_models: tuple[str, ...] = Field(default=tuple(REGISTRY), min_length=1)
    max_rounds: int = Field(default=100, ge=1)
    epsilon_budget: float = Field(default=10.0, gt=0, allow_inf_nan=False)
    max_delta: float = Field(default=1e-5, gt=0, lt=1)
    require_dp: bool = False
    max_clip: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    min_sites: int = Field(default=2, ge=1)
    # the model's shape bounds what one update can carry (see the review's "model shape")
    max_params: int | None = Field(default=None, ge=1)
    min_batch: int = Field(default=1, ge=1)
    # DP whose noise swamps the signal (fed_tasks/dp_usefulness.py): a release's expected
    # noise-to-signal ratio above max_noise_ratio is refused, or run with a warning
    max_noise_ratio: float = Field(default=USEFUL_RATIO, gt=0, allow_inf_nan=False)
    noisy_dp: Literal["refuse", "warn"] = "refuse"
    # empty: any data scientist with an account. The owner may give e-mails; the site binds
    # each to its syft account (see Submitter) before the policy takes effect.
    allowed_submitters: tuple[Submitter, ...] = ()

    @field_validator("allowed_submitters", mode="before")
    @classmethod
    def _emails(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = (value,)
        return tuple({"email": v} if isinstance(v, str) else v for v in value)

    def submitter_ids(self) -> frozenset[str]:
        """The syft user ids (verify keys) allowed to submit; empty if none is bound."""
        return frozenset(s.user_id for s in self.allowed_submitters if s.user_id)

    def bind_submitters(self, resolve: Callable[[str], str | None],
                        previous: DatasetPolicy | None = None) -> DatasetPolicy:
        """This policy with every unbound submitter bound to a syft user id.

        An e-mail ``previous`` had bound keeps that binding, so re-stating the list (or
        changing another field) never moves an entry to whoever holds the e-mail now.
        ``resolve`` maps an e-mail to the id of the account holding it, or None.
        """
        kept = {s.email: s.user_id for s in (previous.allowed_submitters if previous else ())
                if s.user_id}
        bound = tuple(s if s.user_id else Submitter(email=s.email,
                                                    user_id=kept.get(s.email) or resolve(s.email))
                      for s in self.allowed_submitters)
        return self.model_copy(update={"allowed_submitters": bound})

    def violations(self, spec: JobSpec, requester: Requester | str | None = None,
                   remaining: float | None = None, rows: int | None = None) -> list[str]:
        """Every way ``spec`` breaks this policy, in words (empty: it complies).

        ``requester`` None skips the submitter check, ``remaining`` None the budget check;
        ``rows`` (the site's training rows) lets per-row DP's noise be judged too.
        The submitter check compares syft user ids only (a bare string is an id, as the
        site's approval records keep it), never e-mails, which a user can change.
        """
        out = []
        if spec.model == "auto":  # a selection complies if every candidate it trains does
            for sub in spec.candidate_specs:
                out += [f"candidate {sub.model}: {p}" for p in self.violations(sub, None, None)]
        elif spec.model not in self.allowed_models:
            out.append(f"model {spec.model!r} is not allowed (allowed: "
                       f"{', '.join(self.allowed_models)})")
        if spec.rounds > self.max_rounds:
            out.append(f"{spec.rounds} rounds exceed the maximum of {self.max_rounds} per job")
        if spec.min_sites < self.min_sites:
            out.append(f"min_sites={spec.min_sites} is below the policy's minimum of "
                       f"{self.min_sites} sites in any aggregate")
        if self.require_dp and not spec.dp_enabled:
            out.append("differential privacy is required (set dp_epsilon); the job has none")
        if self.max_params is not None and model_parameters(spec) > self.max_params:
            out.append(f"the model has {model_parameters(spec):,} parameters, more than the "
                       f"maximum of {self.max_params:,}")
        if spec.batch_size < self.min_batch:
            out.append(f"batch size {spec.batch_size} is below the minimum of {self.min_batch}")
        if spec.dp_enabled:
            if spec.dp_delta > self.max_delta:
                out.append(f"dp_delta={spec.dp_delta:g} exceeds the maximum delta "
                           f"{self.max_delta:g}")
            if (self.max_clip is not None and spec.dp_clip > self.max_clip
                    and spec.model not in ROW_DP_MODELS):  # pca/hbos: dp_clip unused
                out.append(f"dp_clip={spec.dp_clip:g} exceeds the maximum clipping bound "
                           f"{self.max_clip:g}")
            swamped = dp_usefulness.useless(spec, rows, self.max_noise_ratio)
            if swamped and self.noisy_dp == "refuse":
                out.append(swamped)
            if remaining is not None and spec.dp_epsilon > remaining * (1 + 1e-9):
                out.append(f"dp_epsilon={spec.dp_epsilon:g} exceeds the dataset's remaining "
                           f"privacy budget {remaining:.4g} (of {self.epsilon_budget:g})")
        if requester is not None and self.allowed_submitters:
            who = requester if isinstance(requester, Requester) else Requester(str(requester))
            if who.user_id not in self.submitter_ids():
                out.append(f"{who.words()} may not submit jobs on this dataset (allowed: "
                           f"{', '.join(s.words() for s in self.allowed_submitters)})")
        return out

    def warnings(self, spec: JobSpec, rows: int | None = None) -> list[str]:
        """What the owner's policy lets run but the review must say: DP noise above
        ``max_noise_ratio`` when ``noisy_dp`` is "warn"."""
        if spec.model == "auto" or not spec.dp_enabled or self.noisy_dp != "warn":
            return []
        swamped = dp_usefulness.useless(spec, rows, self.max_noise_ratio)
        return [f"{swamped} (this dataset's policy runs it anyway)"] if swamped else []

    def plain_words(self, dataset: str = DATASET_NAME, spent: float | None = None) -> str:
        """The policy as the data scientist reads it (ends with a machine-readable line)."""
        dp = ("required: every job must set dp_epsilon" if self.require_dp else
              "optional; jobs without it release updates with no formal guarantee and are not "
              "counted against the budget")
        clip = f"at most {self.max_clip:g}" if self.max_clip is not None else "any"
        who = (", ".join(s.words() for s in self.allowed_submitters) if self.allowed_submitters
               else "any data scientist with an account at this site")
        used = "" if spent is None else f"; {spent:.4g} spent so far"
        size = "any" if self.max_params is None else f"at most {self.max_params:,} parameters"
        lines = [
            f"Data owner's policy for dataset {dataset!r} (the site enforces it):",
            f"- models allowed: {', '.join(self.allowed_models)}",
            f"- at most {self.max_rounds} training rounds per job",
            f"- differential privacy {dp}",
            f"- total privacy budget: epsilon {self.epsilon_budget:g} across all jobs"
            f"{used}; delta at most {self.max_delta:g} per job; clipping bound {clip}",
            f"- DP noise: a job whose noise-to-signal ratio on a release exceeds "
            f"{self.max_noise_ratio:g} is "
            + ("refused" if self.noisy_dp == "refuse" else "run with a warning"),
            f"- every aggregate must combine at least {self.min_sites} sites",
            f"- model size: {size}; batch size at least {self.min_batch}",
            f"- who may submit: {who}",
            f"policy-json: {self.model_dump_json()}",
        ]
        return "\n".join(lines)

    @classmethod
    def from_description(cls, text: str) -> DatasetPolicy | None:
        """The policy embedded in a dataset description by :meth:`plain_words`, if any."""
        found = _POLICY_JSON.findall(text or "")
        return cls.model_validate_json(found[-1]) if found else None


def _first_error(exc: ValidationError) -> str:
    """One line of a pydantic error: where and what (no multi-line dump)."""
    err = exc.errors()[0]
    where = ".".join(str(x) for x in err.get("loc", ())) or "policy"
    return f"{where}: {err.get('msg', 'invalid')}"


class PolicyStore:
    """The policies of one site's datasets, on disk (and the base dataset descriptions)."""

    def __init__(self, directory: str | Path, site: str,
                 state: dict[str, Any] | None = None) -> None:
        """Load the policy file, or hold ``state`` (rebuilt from the audit log) unsaved until
        :meth:`save`. Any malformed file is a :class:`PolicyError` (one line, no dump)."""
        self.site = site
        self.path = Path(directory) / POLICY_FILE
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"version": 1, "datasets": {}, "descriptions": {}}
        if state is not None:
            self._state = json.loads(json.dumps(state))
        elif self.path.exists():
            try:
                self._state = json.loads(self.path.read_text())
                if not isinstance(self._state, dict) or not isinstance(
                        self._state.get("datasets", {}), dict) or not isinstance(
                        self._state.get("descriptions", {}), dict):
                    raise ValueError("not an object with 'datasets' and 'descriptions' objects")
                self._state.setdefault("datasets", {})
                for name, raw in self._state["datasets"].items():
                    try:  # fail now, not at the first call
                        DatasetPolicy.model_validate(raw)
                    except ValidationError as exc:
                        raise ValueError(f"dataset {name!r}: {_first_error(exc)}") from None
            except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
                raise PolicyError(f"site {site!r}: policy file {self.path} is unreadable "
                                  f"({exc}); refusing to run on a guessed policy") from None

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def raw(self) -> dict[str, Any]:
        """A copy of what the store holds (policies as JSON, descriptions)."""
        with self._lock:
            return json.loads(json.dumps(self._state))

    def save(self) -> None:
        """Write the store as held now (after a rebuild from the audit log)."""
        with self._lock:
            write_json_atomic(self.path, self._state)

    def get(self, dataset: str = DATASET_NAME) -> DatasetPolicy:
        with self._lock:
            raw = self._state["datasets"].get(dataset)
        return DatasetPolicy.model_validate(raw) if raw else DatasetPolicy()

    def put(self, policy: DatasetPolicy, dataset: str = DATASET_NAME) -> None:
        with self._lock:
            self._state["datasets"][dataset] = json.loads(policy.model_dump_json())
            write_json_atomic(self.path, self._state)

    def base_description(self, dataset: str = DATASET_NAME) -> str:
        with self._lock:
            return str(self._state.get("descriptions", {}).get(dataset, ""))

    def set_base_description(self, text: str, dataset: str = DATASET_NAME) -> None:
        with self._lock:
            self._state.setdefault("descriptions", {})[dataset] = text
            write_json_atomic(self.path, self._state)


def model_parameters(spec: JobSpec) -> int:
    """How many numbers the job's model (and so each update) holds: the longest vector a
    site sends after the statistics (a weight update without its loss and count)."""
    from fed_tasks.schedule import phases

    if spec.model == "auto":
        return max(model_parameters(sub) for sub in spec.candidate_specs)
    return max([p.length - (2 if p.action == "fit" else 0) for p in phases(spec)
                if p.action not in ("stats", "calibrate")], default=0)
