"""The privacy ledger and the dataset policy, checked against and rebuilt from the audit log.

Why: ``privacy_ledger.json`` and ``policy.json`` are plain files; deleting or editing one
would reset a dataset's spent epsilon or silently fall back to the default policy. The
signed, hash-chained audit log already holds every ``budget_charged`` (with the job's and
the dataset's totals) and every ``policy_changed`` (with the new policy), so it is the
reference: a site whose files are missing or disagree with it does not open, and its data
owner can rebuild both from the verified log (``fedsyft site repair``).

What "agree" means:

- ledger: for every dataset and job the log charged, the file holds at least the epsilon,
  delta and number of releases the log records. More is accepted: a charge is written to
  the ledger just before its log entry, so a failed append leaves the file ahead (a
  conservative state; the round was refused);
- policy: the policy in effect (the file's, else the default) equals the last logged one
  (the default if none was logged), and the file exists once the site has published.

Pure functions of the entries and the files' contents; no syft, no writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from datasites.governance.audit import Action
from datasites.governance.ledger import BUDGET_RTOL
from datasites.governance.policy import DATASET_NAME, DatasetPolicy
from fed_tasks.spec import ROW_DP_MODELS

#: Absolute slack when comparing spent epsilon/delta (on top of the relative BUDGET_RTOL).
ABS_TOL = 1e-12


class SiteStateMismatch(RuntimeError):
    """The site's ledger or policy file is missing, unreadable or disagrees with its signed
    audit log; the site refuses to open until its data owner repairs it."""


def _below(have: float, want: float) -> bool:
    return float(have) < float(want) * (1 - BUDGET_RTOL) - ABS_TOL


def ledger_from_log(entries: list[dict[str, Any]],
                    specs: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ledger state the log's ``budget_charged`` entries (and the approvals of code the
    site cannot account, ``request_overridden`` with ``template_ok`` false) imply.

    ``specs`` (job id -> spec as a dict) fills in the descriptive fields of a job record
    (kind, target epsilon, rounds, clip) where the site still knows the job.
    """
    datasets: dict[str, Any] = {}

    def dataset(name: str) -> dict[str, Any]:
        return datasets.setdefault(name, {"epsilon_spent": 0.0, "delta_spent": 0.0, "jobs": {},
                                          "unaccounted": []})

    for e in entries:
        params, objects = e.get("params") or {}, e.get("objects") or {}
        if e.get("action") == Action.BUDGET_CHARGED:
            data, job_id = dataset(str(params.get("dataset"))), str(objects.get("job_id"))
            job = data["jobs"].get(job_id)
            if job is None:
                spec = (specs or {}).get(job_id) or {}
                job = data["jobs"][job_id] = {
                    "releases": 0, "epsilon": 0.0, "delta": float(params.get("delta") or 0.0),
                    "charges": [], **_job_info(spec)}
                data["delta_spent"] = float(data["delta_spent"]) + job["delta"]
            job["charges"].append(float(params.get("epsilon") or 0.0))
            job["releases"] = max(int(job["releases"]), int(params.get("release") or 0))
            job["epsilon"] = max(float(job["epsilon"]), float(params.get("job_epsilon") or 0.0))
            if params.get("noise_multiplier") is not None:
                job["noise_multiplier"] = params["noise_multiplier"]
            data["epsilon_spent"] = max(float(data["epsilon_spent"]) + job["charges"][-1],
                                        float(params.get("dataset_epsilon_spent") or 0.0))
        elif (e.get("action") == Action.REQUEST_OVERRIDDEN
              and params.get("decision") == "approved" and params.get("template_ok") is False):
            dataset(DATASET_NAME)["unaccounted"].append({
                "request_id": objects.get("request_id"), "code_hash": e.get("code_hash"),
                "approved_by": e.get("actor"), "reason": params.get("reason"),
                "job_id": objects.get("job_id")})
    return {"version": 1, "datasets": datasets}


def _job_info(spec: dict[str, Any]) -> dict[str, Any]:
    if not spec:
        return {}
    if spec.get("model") in ROW_DP_MODELS:  # noised sums (fed_tasks/dp_sums.py)
        return {"kind": "dp_sums", "target_epsilon": spec.get("dp_epsilon"),
                "clip": spec.get("dp_row_clip") if spec.get("model") == "pca" else None}
    return {"kind": "dp_sgd" if spec.get("dp_sgd") else "dp_fedavg",
            "target_epsilon": spec.get("dp_epsilon"), "rounds": spec.get("rounds"),
            "clip": spec.get("dp_clip")}


def ledger_problems(state: dict[str, Any], expected: dict[str, Any], path: Path) -> list[str]:
    """How the ledger ``state`` (read from ``path``) falls short of the log's ``expected``."""
    out: list[str] = []
    for name, want in expected["datasets"].items():
        if not want["jobs"]:
            continue  # only unaccounted approvals: informational, no budget at stake
        have = state["datasets"].get(name)
        if have is None:
            out.append(f"{path} has no entry for dataset {name!r}, but the signed audit log "
                       f"records epsilon {want['epsilon_spent']:.6g} spent on it")
            continue
        spent = float(have.get("epsilon_spent", 0.0))
        if _below(spent, want["epsilon_spent"]):
            out.append(f"{path} says dataset {name!r} spent epsilon {spent:.6g}, but the "
                       f"signed audit log records {want['epsilon_spent']:.6g}")
        delta = float(have.get("delta_spent", 0.0))
        if _below(delta, want["delta_spent"]):
            out.append(f"{path} says dataset {name!r} spent delta {delta:.6g}, but the signed "
                       f"audit log records {want['delta_spent']:.6g}")
        for job_id, wjob in want["jobs"].items():
            hjob = have.get("jobs", {}).get(job_id)
            if hjob is None:
                out.append(f"{path} has no charges of job {job_id!r} on dataset {name!r}, but "
                           f"the signed audit log records {wjob['releases']} (epsilon "
                           f"{wjob['epsilon']:.6g})")
            elif int(hjob["releases"]) < wjob["releases"] or _below(hjob["epsilon"],
                                                                     wjob["epsilon"]):
                out.append(f"{path} says job {job_id!r} was charged epsilon "
                           f"{float(hjob['epsilon']):.6g} in {hjob['releases']} release(s), but "
                           f"the signed audit log records {wjob['epsilon']:.6g} in "
                           f"{wjob['releases']}")
    return out


def missing_ledger_problem(expected: dict[str, Any], path: Path) -> str:
    """The problem of a missing ledger file ("" if the log charged nothing)."""
    charged = {n: d for n, d in expected["datasets"].items() if d["jobs"]}
    if not charged:
        return ""
    count = sum(len(j["charges"]) for d in charged.values() for j in d["jobs"].values())
    spent = ", ".join(f"epsilon {d['epsilon_spent']:.6g} on dataset {n!r}"
                      for n, d in charged.items())
    return (f"privacy ledger {path} is missing, but the signed audit log records {count} "
            f"budget charge(s) ({spent})")


def policies_from_log(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last logged policy of each dataset (``policy_changed`` ``new``), as JSON.

    A last policy that no longer validates (logged under an older policy schema) cannot be
    compared or restored: that dataset is left out, and its file is trusted as before.
    """
    last: dict[str, Any] = {}
    for e in entries:
        params = e.get("params") or {}
        if e.get("action") == Action.POLICY_CHANGED:
            last[str(params.get("policy"))] = params.get("new")
    out = {}
    for name, raw in last.items():
        try:
            out[name] = json.loads(DatasetPolicy.model_validate(raw).model_dump_json())
        except ValueError:  # pydantic's ValidationError
            continue
    return out


def descriptions_from_log(entries: list[dict[str, Any]]) -> dict[str, str]:
    """The base dataset descriptions logged at publication (``dataset_published``)."""
    return {str((e.get("objects") or {}).get("dataset_id")): str(e["params"]["description"])
            for e in entries if e.get("action") == Action.DATASET_PUBLISHED
            and isinstance((e.get("params") or {}).get("description"), str)}


def policy_problems(state: dict[str, Any] | None, entries: list[dict[str, Any]],
                    path: Path) -> list[str]:
    """How the policy file's ``state`` (None: missing) disagrees with the log."""
    logged = policies_from_log(entries)
    if state is None:
        published = any(e.get("action") == Action.DATASET_PUBLISHED for e in entries)
        if not (logged or published):
            return []  # nothing published yet: the default policy is the right one
        which = ", ".join(repr(n) for n in logged) or "the published dataset"
        return [f"policy file {path} is missing, but the signed audit log records the policy "
                f"of {which}"]
    out = []
    held = state.get("datasets", {})
    unreadable = {str((e.get("params") or {}).get("policy")) for e in entries
                  if e.get("action") == Action.POLICY_CHANGED} - set(logged)
    for name in sorted((set(logged) | set(held)) - unreadable):
        have = DatasetPolicy.model_validate(held[name]) if name in held else DatasetPolicy()
        want = (DatasetPolicy.model_validate(logged[name]) if name in logged
                else DatasetPolicy())
        if have != want:
            fields = [f"{f} {getattr(have, f)!r} instead of {getattr(want, f)!r}"
                      for f in DatasetPolicy.model_fields if getattr(have, f) != getattr(want, f)]
            out.append(f"{path} holds a policy for dataset {name!r} that differs from the last "
                       f"one in the signed audit log ({'; '.join(fields)})")
    return out


def specs_from_approvals(directory: Path) -> dict[str, dict[str, Any]]:
    """Job id -> spec (as a dict) from the guard's approvals file, best effort."""
    try:
        jobs = json.loads((directory / "approvals.json").read_text()).get("jobs", {})
        return {str(k): json.loads(v["spec"]) for k, v in jobs.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
