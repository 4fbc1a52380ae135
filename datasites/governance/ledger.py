"""The site's privacy ledger: how much epsilon each dataset has spent, job by job, on disk.

One JSON file per site directory (``privacy_ledger.json``), replaced atomically (write to a
temporary file, fsync, ``os.replace``) so a crash leaves either the old or the new ledger,
never half of one. A job is charged *before* each of its releases leaves the site; the
charge for its k-th release is the increase of the job's accountant figure,
``eps_job(k) - eps_job(k-1)`` (RDP composition within the job). Jobs compose with each
other by simple addition (basic composition: epsilons add, deltas add), which is
conservative. A charge that would take a dataset past its budget is refused.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasites.runtime.site_files import write_private
from fed_tasks.interface import BUDGET_EXHAUSTED

LEDGER_FILE = "privacy_ledger.json"
#: Slack for float rounding when a job's charges add up to exactly the remaining budget.
BUDGET_RTOL = 1e-9


class BudgetExceeded(PermissionError):
    """This release would take the dataset past its epsilon budget."""


class LedgerCorrupt(RuntimeError):
    """The ledger file cannot be read; the site must not run DP jobs on a guess."""


def write_json_atomic(path: Path, data: Any) -> None:
    """Replace ``path`` by ``data`` as JSON, all or nothing, mode 0600 whatever the umask
    (see :func:`datasites.runtime.site_files.write_private`)."""
    write_private(path, json.dumps(data, indent=1, sort_keys=True))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
        value)


def _shape_problem(state: Any) -> str:
    """What makes ``state`` not a ledger ("" if nothing): the numbers a charge reads must be
    numbers, so that a hand-edited file fails at open, not in the middle of a round."""
    if not isinstance(state, dict) or not isinstance(state.get("datasets"), dict):
        return "no 'datasets' object"
    for name, data in state["datasets"].items():
        if not isinstance(data, dict) or not isinstance(data.get("jobs", {}), dict):
            return f"dataset {name!r} is not an object with a 'jobs' object"
        for key in ("epsilon_spent", "delta_spent"):
            if not _number(data.get(key, 0.0)) or data.get(key, 0.0) < 0:
                return f"dataset {name!r}: {key} is not a non-negative number"
        for job_id, job in data.get("jobs", {}).items():
            if not isinstance(job, dict) or not _number(job.get("epsilon")) or not isinstance(
                    job.get("releases"), int) or not isinstance(job.get("charges"), list):
                return f"dataset {name!r}: job {job_id!r} lacks epsilon, releases or charges"
        if not isinstance(data.get("unaccounted", []), list):
            return f"dataset {name!r}: 'unaccounted' is not a list"
    return ""


@dataclass(frozen=True)
class Charge:
    """One recorded charge: the ``release``-th training release of ``job_id``."""

    dataset: str
    job_id: str
    release: int
    epsilon: float  # this release's increment
    job_epsilon: float  # the job's total so far at this site
    dataset_spent: float  # the dataset's total after this charge
    budget: float
    delta: float  # the job's delta (counted once per job in the dataset's delta total)


class PrivacyLedger:
    """Per-dataset epsilon/delta spent at one site, persisted in its directory."""

    def __init__(self, directory: str | Path, site: str,
                 state: dict[str, Any] | None = None) -> None:
        """Load the ledger file, or hold ``state`` (rebuilt from the audit log) unsaved until
        :meth:`save`: a site repairs its files only once its data owner has logged in."""
        self.site = site
        self.path = Path(directory) / LEDGER_FILE
        self._lock = threading.Lock()
        self._state = self._load() if state is None else json.loads(json.dumps(state))

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"version": 1, "datasets": {}}
        try:
            state = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LedgerCorrupt(f"site {self.site!r}: privacy ledger {self.path} is unreadable "
                                f"({exc}); refusing to guess how much budget is left") from exc
        problem = _shape_problem(state)
        if problem:
            raise LedgerCorrupt(f"site {self.site!r}: privacy ledger {self.path} is malformed "
                                f"({problem}); refusing to guess how much budget is left")
        return state

    def save(self) -> None:
        """Write the ledger as held now (after a rebuild from the audit log)."""
        with self._lock:
            write_json_atomic(self.path, self._state)

    def _dataset(self, dataset: str) -> dict[str, Any]:
        return self._state["datasets"].setdefault(
            dataset, {"epsilon_spent": 0.0, "delta_spent": 0.0, "jobs": {}, "unaccounted": []})

    # ---- reading -----------------------------------------------------------------------
    def spent(self, dataset: str) -> float:
        with self._lock:
            return float(self._state["datasets"].get(dataset, {}).get("epsilon_spent", 0.0))

    def delta_spent(self, dataset: str) -> float:
        with self._lock:
            return float(self._state["datasets"].get(dataset, {}).get("delta_spent", 0.0))

    def remaining(self, dataset: str, budget: float) -> float:
        return max(0.0, float(budget) - self.spent(dataset))

    def job(self, dataset: str, job_id: str) -> dict[str, Any] | None:
        """What ``job_id`` has been charged on ``dataset`` (a copy), or None."""
        with self._lock:
            job = self._state["datasets"].get(dataset, {}).get("jobs", {}).get(job_id)
            return json.loads(json.dumps(job)) if job else None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._state))

    # ---- writing -----------------------------------------------------------------------
    def charge(self, dataset: str, job_id: str, *, budget: float, delta: float,
               cumulative: Callable[[int], float], info: dict[str, Any] | None = None
               ) -> Charge:
        """Charge the job's next release, or raise :class:`BudgetExceeded` (nothing changes).

        ``cumulative(k)`` is the job's accountant epsilon after k releases at this site.
        """
        with self._lock:
            data = self._dataset(dataset)
            job = data["jobs"].get(job_id) or {"releases": 0, "epsilon": 0.0, "delta": delta,
                                               "charges": [], **(info or {})}
            release, total, amount, spent = self._next(dataset, job_id, budget, cumulative)
            first = job["releases"] == 0
            job.update(releases=release, epsilon=total)
            job["charges"].append(amount)
            data["jobs"][job_id] = job
            data["epsilon_spent"] = spent + amount
            if first:
                data["delta_spent"] = float(data["delta_spent"]) + float(delta)
            write_json_atomic(self.path, self._state)
            return Charge(dataset, job_id, release, amount, total, spent + amount, float(budget),
                          float(delta))

    def check(self, dataset: str, job_id: str, *, budget: float,
              cumulative: Callable[[int], float]) -> float:
        """What the job's next release would cost; raises :class:`BudgetExceeded` if the
        dataset cannot afford it. Changes nothing (the charge itself re-checks)."""
        with self._lock:
            return self._next(dataset, job_id, budget, cumulative)[2]

    def _next(self, dataset: str, job_id: str, budget: float,
              cumulative: Callable[[int], float]) -> tuple[int, float, float, float]:
        data = self._state["datasets"].get(dataset, {})
        job = data.get("jobs", {}).get(job_id) or {"releases": 0, "epsilon": 0.0}
        release = int(job["releases"]) + 1
        total = float(cumulative(release))
        amount = max(0.0, total - float(job["epsilon"]))
        spent = float(data.get("epsilon_spent", 0.0))
        if not math.isfinite(amount) or spent + amount > budget * (1 + BUDGET_RTOL):
            left = max(0.0, budget - spent)
            raise BudgetExceeded(
                f"{BUDGET_EXHAUSTED} for dataset {dataset!r} at site {self.site!r}: release "
                f"{release} of job {job_id!r} would cost epsilon {amount:.4g}, but only "
                f"{left:.4g} of the dataset's budget {budget:g} is left ({spent:.4g} spent)")
        return release, total, amount, spent

    def record_unaccounted(self, dataset: str, entry: dict[str, Any]) -> None:
        """Remember an approval whose privacy cost the site cannot account (an override of
        code that is not the fedsyft template): visible to the owner and the officer."""
        with self._lock:
            self._dataset(dataset)["unaccounted"].append(dict(entry))
            write_json_atomic(self.path, self._state)
