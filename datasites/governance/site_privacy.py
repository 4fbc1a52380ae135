"""The site's enforcement of its data owner's policy and privacy budget, call by call.

Owned by the site's guard (``guard.privacy``) so that every approved call consults it
through :func:`datasites.runtime.site_entry.run_approved`, whoever wrote the data scientist's code:

- the dataset's *current* policy is re-checked at every call (an owner who tightens the
  policy stops running jobs that no longer comply);
- a DP job's training release (or, for pca/hbos, each noised sum: ``fed_tasks.dp_sums``)
  is charged to the dataset's ledger before it is computed, and refused if it would
  overspend the budget (``privacy budget exhausted ...``); any other summed action of a DP
  job is refused (fail closed);
- a DP job's one-off feature statistics come from the site's *published mock* (public
  already, so they cost no budget) instead of the private table;
- the noise share of client-level DP is sized by the smallest aggregate this site's secure
  aggregation can reveal.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datasites.governance import ledger_check
from datasites.governance.audit import Action, AuditError, AuditLog
from datasites.governance.audit import Role as AuditRole
from datasites.governance.guard import CallRefused
from datasites.governance.ledger import (
    LEDGER_FILE,
    BudgetExceeded,
    Charge,
    LedgerCorrupt,
    PrivacyLedger,
    write_json_atomic,
)
from datasites.governance.ledger_check import SiteStateMismatch
from datasites.governance.policy import (
    DATASET_NAME,
    POLICY_FILE,
    DatasetPolicy,
    PolicyError,
    PolicyStore,
)
from fed_tasks import dp_step, dp_sums, site_step
from fed_tasks.spec import JobSpec

PUBLIC_MOMENTS_FILE = "public_mock_moments.json"
SYSTEM_ACTOR = "fedsyft"
log = logging.getLogger(__name__)


__all__ = ["PrivacyRefused", "SitePrivacy", "SiteStateMismatch"]


def _noised(spec: JobSpec, action: str) -> bool:
    """Whether this site noises and charges ``action`` of a DP job: a training round of a
    neural job, or a summed release of a pca/hbos job (``fed_tasks.dp_sums``)."""
    if dp_sums.applies(spec):
        return dp_sums.covers(spec, action)
    return action == "fit"


class PrivacyRefused(CallRefused):
    """The site's policy or budget forbids this call; the message is for the data scientist
    (the entry point turns it into a refusal envelope)."""


class SitePrivacy:
    """Policy store, privacy ledger and public mock statistics of one site directory."""

    def __init__(self, directory: str | Path, site: str, audit: AuditLog, *,
                 check_files: bool = True) -> None:
        """Load the policy and the ledger, checked against the signed audit log.

        A missing, unreadable or disagreeing file raises :class:`SiteStateMismatch` naming
        the file and what differs (see :mod:`datasites.governance.ledger_check`), and nothing is
        written. ``check_files=False`` is the data owner's repair: the files that disagree
        are held rebuilt from the log, in memory, until :meth:`repair` writes them.
        """
        self.site = site
        self.directory = Path(directory)
        self.audit = audit
        entries = audit.entries() if audit.count else []
        self.policies, policy_problems = self._open_policies(entries)
        self.ledger, ledger_problems = self._open_ledger(entries)
        #: what disagrees with the audit log, per file name (empty: the files agree)
        self.file_problems: dict[str, list[str]] = {
            name: found for name, found in ((POLICY_FILE, policy_problems),
                                            (LEDGER_FILE, ledger_problems)) if found}
        if self.file_problems and check_files:
            problems = "; ".join(p for found in self.file_problems.values() for p in found)
            raise SiteStateMismatch(
                f"site {site!r} refuses to open: {problems}; run `fedsyft site repair --site "
                f"{self.directory}` (data owner) to rebuild it from the signed audit log")

    def _open_policies(self, entries: list[dict[str, Any]]) -> tuple[PolicyStore, list[str]]:
        """The policy store, or (if its file disagrees) one rebuilt from the log."""
        path = self.directory / POLICY_FILE
        try:
            store = PolicyStore(self.directory, self.site)
            found = ledger_check.policy_problems(store.raw() if store.exists else None, entries,
                                               path)
            descriptions = store.raw().get("descriptions", {})
        except PolicyError as exc:
            store, found, descriptions = None, [str(exc).removeprefix(f"site {self.site!r}: ")
                                                ], {}
        if not found and store is not None:
            return store, []
        rebuilt = {"version": 1, "datasets": ledger_check.policies_from_log(entries),
                   "descriptions": descriptions or ledger_check.descriptions_from_log(entries)}
        return PolicyStore(self.directory, self.site, state=rebuilt), found

    def _open_ledger(self, entries: list[dict[str, Any]]) -> tuple[PrivacyLedger, list[str]]:
        """The privacy ledger, or (if its file disagrees) one rebuilt from the log."""
        path = self.directory / LEDGER_FILE
        expected = ledger_check.ledger_from_log(entries,
                                              ledger_check.specs_from_approvals(self.directory))
        try:
            ledger = PrivacyLedger(self.directory, self.site)
            if ledger.exists:
                found = ledger_check.ledger_problems(ledger.snapshot(), expected, path)
            else:
                found = [p for p in [ledger_check.missing_ledger_problem(expected, path)] if p]
        except LedgerCorrupt as exc:
            found = [str(exc).removeprefix(f"site {self.site!r}: ")]
        if not found:
            return ledger, []
        return PrivacyLedger(self.directory, self.site, state=expected), found

    def repair(self, by: str) -> dict[str, list[str]]:
        """Write the files rebuilt from the audit log (see ``check_files``); returns what
        was wrong, per file ({}: nothing to do).

        Logged first (``site_state_rebuilt``, with the problems and the rebuilt totals), as
        every change a site makes: if the entry cannot be written, nothing is rewritten.
        """
        if not self.file_problems:
            return {}
        fixed = dict(self.file_problems)
        spent = {name: {"epsilon_spent": data["epsilon_spent"],
                        "delta_spent": data["delta_spent"], "jobs": len(data["jobs"])}
                 for name, data in self.ledger.snapshot()["datasets"].items()}
        self.audit.append(by, AuditRole.DATA_OWNER, Action.SITE_STATE_REBUILT,
                          objects={"site": self.site},
                          params={"files": sorted(fixed),
                                  "problems": [p[:500] for f in fixed.values() for p in f][:20],
                                  "ledger": spent if LEDGER_FILE in fixed else None,
                                  "policies": (self.policies.raw()["datasets"]
                                               if POLICY_FILE in fixed else None)})
        if POLICY_FILE in fixed:
            self.policies.save()
        if LEDGER_FILE in fixed:
            self.ledger.save()
        self.file_problems = {}
        return fixed

    def log_initial_policy(self, by: str, dataset: str = DATASET_NAME) -> None:
        """Log the dataset's policy at publication (``policy_changed`` from nothing) and
        write it, so that the policy file can always be checked against the log."""
        policy = self.policy(dataset)
        self.audit.append(by, AuditRole.DATA_OWNER, Action.POLICY_CHANGED,
                          objects={"dataset_id": dataset},
                          params={"policy": dataset, "old": None,
                                  "new": json.loads(policy.model_dump_json()),
                                  "reason": "initial policy, at publication"})
        self.policies.put(policy, dataset)

    # ---- policy --------------------------------------------------------------------------
    def policy(self, dataset: str = DATASET_NAME) -> DatasetPolicy:
        return self.policies.get(dataset)

    def remaining(self, dataset: str = DATASET_NAME) -> float:
        return self.ledger.remaining(dataset, self.policy(dataset).epsilon_budget)

    def set_policy(self, policy: DatasetPolicy, by: str, reason: str = "",
                   dataset: str = DATASET_NAME) -> DatasetPolicy:
        """Replace the dataset's policy; logged (``policy_changed``) before it takes effect."""
        old = self.policy(dataset)
        self.audit.append(by, AuditRole.DATA_OWNER, Action.POLICY_CHANGED,
                          objects={"dataset_id": dataset},
                          params={"policy": dataset, "old": json.loads(old.model_dump_json()),
                                  "new": json.loads(policy.model_dump_json()),
                                  "reason": reason})
        self.policies.put(policy, dataset)
        return old

    def describe(self, dataset: str = DATASET_NAME) -> str:
        """The dataset's description for the data scientist: base text + policy."""
        base = self.policies.base_description(dataset)
        policy = self.policy(dataset).plain_words(dataset, spent=self.ledger.spent(dataset))
        return f"{base}\n\n{policy}" if base else policy

    def check_job(self, spec: JobSpec, requester: str | None,
                  dataset: str = DATASET_NAME, rows: int | None = None) -> list[str]:
        """Policy violations of ``spec`` at request time, including the remaining budget
        (plus what this job was already charged, for a revoked job approved again);
        ``rows``, the site's training rows, judges per-row DP noise too."""
        left = self.remaining(dataset) + self.job_epsilon(spec.job_id, dataset)
        return self.policy(dataset).violations(spec, requester, left, rows)

    # ---- public statistics of the mock -----------------------------------------------------
    def register_public_mock(self, mocks: dict[str, pd.DataFrame]) -> None:
        """Keep the column moments of the published mock tables (public already)."""
        out = {}
        for split, frame in mocks.items():
            numeric = frame.select_dtypes("number")
            x = numeric.to_numpy(dtype=np.float64)
            out[split] = {"columns": [str(c) for c in numeric.columns], "count": int(len(x)),
                          "sum": x.sum(axis=0).tolist(), "sumsq": np.square(x).sum(axis=0).tolist()}
        write_json_atomic(self.directory / PUBLIC_MOMENTS_FILE, out)

    def public_stats(self, spec: JobSpec) -> np.ndarray:
        """``[count, Σx, Σx²]`` of the job's features over the published mock train table."""
        path = self.directory / PUBLIC_MOMENTS_FILE
        mock = json.loads(path.read_text()).get("train") if path.exists() else None
        if not mock or mock["count"] < 2:
            raise PrivacyRefused(f"site {self.site!r} has no published mock to scale features "
                                 "from; a DP job's statistics never come from the private table")
        idx = {c: i for i, c in enumerate(mock["columns"])}
        missing = [f for f in spec.features if f not in idx]
        if missing:
            raise PrivacyRefused(f"the published mock at {self.site!r} lacks columns {missing}")
        pick = [idx[f] for f in spec.features]
        return np.concatenate([[float(mock["count"])], np.asarray(mock["sum"])[pick],
                               np.asarray(mock["sumsq"])[pick]])

    # ---- the call path ---------------------------------------------------------------------
    def admit(self, spec: JobSpec, action: str, n_rows: int,
              approval: dict[str, Any] | None) -> None:
        """Refuse, before the call is counted or logged as executed, a call that the current
        policy forbids or whose training release the dataset's budget cannot afford."""
        request = (approval or {}).get("request") or {}
        problems = self.policy().violations(spec, request.get("requester") or None,
                                            rows=n_rows)
        if problems:
            raise PrivacyRefused(f"job {spec.job_id!r} does not comply with the current policy "
                                 f"of dataset {DATASET_NAME!r} at site {self.site!r}: "
                                 + "; ".join(problems))
        if spec.dp_enabled and _noised(spec, action):
            try:
                self.ledger.check(DATASET_NAME, spec.job_id,
                                  budget=self.policy().epsilon_budget,
                                  cumulative=lambda k: dp_step.cumulative_epsilon(spec, k,
                                                                                  n_rows))
            except BudgetExceeded as exc:
                raise PrivacyRefused(str(exc)) from None

    def run_step(self, spec: JobSpec, action: str, given: site_step.StepInput,
                 train: pd.DataFrame, test: pd.DataFrame,
                 approval: dict[str, Any] | None) -> dict[str, Any]:
        """Check the current policy, charge the budget, then run the site step on the
        model the site holds (``given``)."""
        self.admit(spec, action, len(train), approval)
        request = (approval or {}).get("request") or {}
        if spec.dp_enabled and action not in ("stats", "evaluate") and not _noised(spec,
                                                                                   action):
            # fail closed: a sum this site cannot noise and charge yet never leaves a DP job
            raise PrivacyRefused(f"job {spec.job_id!r} asks for {action!r} under differential "
                                 "privacy, which this site cannot noise; refused")
        if not spec.dp_enabled or action == "evaluate":
            return site_step.run(spec, action, given, train, test)
        if action == "stats":
            return {"vector": self.public_stats(spec)}
        self.charge(spec, len(train), request, given.round)
        shares = None if spec.dp_sgd else dp_step.noise_shares(spec, self._secure_floor(spec))
        return site_step.run(spec, action, given, train, test, noise_shares=shares)

    def charge(self, spec: JobSpec, n_rows: int, request: dict[str, Any] | None = None,
               round_no: Any = None) -> Charge:
        """Charge the job's next release (a training round, or a noised sum) to the ledger,
        then log it.

        The charge is kept even if the computation then fails: whether a call on private
        data succeeded can itself depend on the data, so only refusals before this point
        are free.
        """
        policy = self.policy()
        z = dp_step.noise_multiplier(spec, n_rows)
        info = {"kind": "dp_sgd" if spec.dp_sgd else "dp_fedavg",
                "target_epsilon": spec.dp_epsilon, "rounds": spec.rounds,
                "noise_multiplier": z, "clip": spec.dp_clip}
        if dp_sums.applies(spec):  # per-row noise on each summed release
            info |= {"kind": "dp_sums", "rounds": dp_sums.releases(spec),
                     "clip": spec.dp_row_clip if spec.model == "pca" else None}
        try:
            charge = self.ledger.charge(DATASET_NAME, spec.job_id, budget=policy.epsilon_budget,
                                        delta=spec.dp_delta, info=info,
                                        cumulative=lambda k: dp_step.cumulative_epsilon(
                                            spec, k, n_rows))
        except BudgetExceeded as exc:
            raise PrivacyRefused(str(exc)) from None
        objects = {"job_id": spec.job_id, **{k: str(request[k]) for k in ("request_id",)
                                             if request and request.get(k)}}
        try:
            self.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, Action.BUDGET_CHARGED,
                              objects=objects,
                              params={"dataset": DATASET_NAME, "epsilon": charge.epsilon,
                                      "delta": charge.delta, "job_epsilon": charge.job_epsilon,
                                      "dataset_epsilon_spent": charge.dataset_spent,
                                      "budget": charge.budget, "release": charge.release,
                                      "round": round_no if isinstance(round_no, int) else None,
                                      "noise_multiplier": z})
        except AuditError as exc:
            log.error("site %s: budget charge of job %s not logged: %s", self.site, spec.job_id,
                      exc)
            raise PrivacyRefused(f"site {self.site!r} cannot record the privacy charge in its "
                                 "audit log; refusing to run the round") from None
        return charge

    def _secure_floor(self, spec: JobSpec) -> int | None:
        """The smallest sum this site's secure aggregation can reveal: the site opens no
        secure sum of fewer than max(threshold, min_sites) sites."""
        if spec.aggregation != "secagg":
            return None  # paillier: the key authority decrypts only sums of >= min_sites
        from datasites.runtime.federation_config import read_config
        from privacy.secagg import default_threshold

        config = read_config(self.directory)
        if not config:
            return None
        return max(default_threshold(int(config["max_sites"])), spec.min_sites)

    def job_epsilon(self, job_id: str, dataset: str = DATASET_NAME) -> float:
        """What the ledger charged ``job_id`` on ``dataset`` so far (0 if nothing)."""
        job = self.ledger.job(dataset, job_id)
        return float(job["epsilon"]) if job else 0.0
