"""The key authority: a datasite that holds the Paillier private key and decrypts sums only.

It publishes no data, only a "keyring" asset (the key's fingerprint; syft needs an asset for
approved code to run on). The data scientist submits one request per job; once its owner
approves, each call hands it the sites' signed contributions for one round; it checks them
(:class:`privacy.key_authority.KeyAuthority`: signatures, job, round, distinct sites ≥ k,
no replay), forms the sum itself, and returns only the decrypted sum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from datasites.adapter import job_code
from datasites.governance.accounts import Account
from datasites.governance.call_audit import audited_call
from datasites.governance.guard import CallRefused, guard_for
from datasites.runtime.datasite import Datasite
from datasites.runtime.federation_config import (
    load_authority_key,
    load_site_keys,
    read_config,
    store_paillier_key,
)
from datasites.runtime.site_entry import job_lock
from fed_tasks.buffered import staleness_of, summands, whole_weight
from fed_tasks.codec import PayloadError, dumps, encode_array, loads
from fed_tasks.schedule import SUMMED_ACTIONS, codec_for, slot_index, total_slots, vector_length
from fed_tasks.selection import candidate_job
from fed_tasks.spec import JobSpec
from privacy.key_authority import BufferRule, KeyAuthority, KeyAuthorityError
from privacy.paillier import (
    PackingLayout,
    PaillierError,
    fingerprint,
    generate_keypair,
    public_key_to_str,
)
from privacy.signing import SignedAggregate

KEYRING = "keyring"


class KeyAuthoritySite(Datasite):
    """A datasite whose only asset is the authority's key fingerprint."""

    holds_data = False  # no dataset: no dataset policy or privacy budget to apply

    @classmethod
    def provision_authority(cls, name: str, directory: str | Path, scientist: Account,
                            key_bits: int = 2048, *, owner_password: str | None = None,
                            officer_password: str | None = None,
                            owner_email: str | None = None, officer_email: str | None = None,
                            commit: bool = True, store: str | None = None
                            ) -> KeyAuthoritySite:
        """Provision the authority; its private key is stored before it is moved into place
        (``commit=False``: the caller commits, e.g. after writing the federation config)."""
        public, private_key = generate_keypair(key_bits)
        fp = fingerprint(public)
        private = {KEYRING: pd.DataFrame({"key_fingerprint": [fp]})}
        mocks = {KEYRING: pd.DataFrame({"key_fingerprint": ["mock"]})}
        site = cls._provision(name, directory, scientist, owner_email, private, mocks,
                              f"Key authority {name}: decrypts only checked sums.",
                              owner_password=owner_password, officer_password=officer_password,
                              officer_email=officer_email, commit=False, store=store)
        try:
            store_paillier_key(site.directory, private_key)
        except BaseException:
            site.discard()
            raise
        site.public_key = public_key_to_str(public)
        return site.commit() if commit else site

    def commit(self) -> KeyAuthoritySite:
        """As :meth:`Datasite.commit`; the public key carries over."""
        site = super().commit()
        site.public_key = self.public_key
        return site

    def parse_request(self, source: str) -> JobSpec:
        return job_code.parse_request(source, self.name, kind="authority")

    def call_limits(self, spec: JobSpec) -> dict[str, int]:
        """One decryption per summed call of the job's schedule (every candidate's)."""
        if spec.model == "auto":
            return {"decrypt": sum(total_slots(sub) for sub in spec.candidate_specs)}
        return {"decrypt": total_slots(spec)}


def _authority(directory: Path, spec: JobSpec, action: str) -> KeyAuthority:
    config = read_config(directory)
    if config is None:
        raise CallRefused("key authority has no federation configuration")
    min_sites = max(int(config["min_sites"]), spec.min_sites)
    codec = codec_for(spec, action)
    layout = PackingLayout(codec.frac_bits, codec.bound,
                           summands(spec, action, int(config["max_sites"])))
    return KeyAuthority(load_authority_key(directory), config["sites"], min_sites,
                        spent_path=directory / f"spent_{spec.job_id}.json",
                        layout=layout)


@audited_call  # what leaves (the decrypted sum) is logged before it leaves
def run_key_authority(*, site: str, job_id: str, spec: str, keyring: pd.DataFrame,
                      action: str, payload: str) -> str:
    """Entry point of the authority's approved code (see :mod:`datasites.runtime.site_entry`)."""
    try:
        job = JobSpec.from_json(spec)
        if job.job_id != job_id or action != "decrypt":
            raise CallRefused("the authority only decrypts sums of its approved job")
        guard = guard_for(site)
        if guard.classify({KEYRING: keyring}) == "mock":
            return dumps({"status": "mock"})
        guard.authorize(job, action)
        request = loads(payload)
        req = AuthorityRequest.model_validate(request)
        job = candidate_job(job, req.candidate)  # a selection job's candidate, derived here
        try:  # the slot follows from the approved spec, not from the request
            slot = slot_index(job, req.action, req.round)
        except PayloadError as exc:
            raise CallRefused(f"the authority decrypts only the job's own aggregates: {exc}"
                              ) from None
        length = vector_length(job, req.action)
        # one decryption of a job at a time, its spent store read and written under the lock:
        # two calls in flight could otherwise each decrypt a sum the other one spends (and
        # their difference would be one site's update)
        with job_lock(guard.directory, job.job_id):
            checked = _authority(guard.directory, job, req.action).decrypt_checked(
                job.job_id, slot, list(req.contributions), expected_length=length,
                buffer=_buffer_rule(job, slot) if job.async_k and req.action == "fit"
                else None)
        payload = encode_array(checked.total)
        # the sites move their model only by a sum the authority signed (aggregate_check)
        attestation = SignedAggregate.create(
            load_site_keys(guard.directory, site).signing_key, job.job_id, slot,
            checked.contributors, checked.model, payload, checked.parts)
        return dumps({"status": "ok", "result": {"sum": payload,
                                                 "attestation": attestation.to_str()}})
    except CallRefused as exc:
        return dumps({"status": "refused", "reason": str(exc)})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "request"
        return dumps({"status": "refused", "reason": f"decrypt request field {where!r}: "
                      f"{err.get('msg')}"})
    except (KeyAuthorityError, PaillierError, PayloadError, KeyError, ValueError) as exc:
        return dumps({"status": "refused", "reason": f"{type(exc).__name__}: {exc}"})


def _buffer_rule(job: JobSpec, index: int) -> BufferRule:
    """A buffered training sum's rule, from the approved job: updates computed for a training
    slot at most ``max_staleness`` before ``index``, weighed by their staleness."""

    def accepts(slot: int) -> bool:
        try:
            staleness_of(job, index, slot)
        except PayloadError:
            return False
        return True

    return BufferRule(accepts=accepts, weight=lambda slot: whole_weight(index - slot))


class AuthorityRequest(BaseModel):
    """One decryption request as the orchestrator sends it (schema-checked)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    action: Literal[SUMMED_ACTIONS]  # type: ignore[valid-type]
    round: int = Field(ge=0)  # the pass of the action (training round r; statistics: 0)
    length: int | None = None  # informational: the authority derives the length itself
    contributions: list[str] = Field(max_length=1000)
    candidate: int | None = None  # a model-selection job's candidate (JobSpec.candidate_spec)

