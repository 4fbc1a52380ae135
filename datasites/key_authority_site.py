"""The key authority: a datasite that holds the Paillier private key and decrypts sums only.

It publishes no data, only a "keyring" asset (the key's fingerprint; syft needs an asset for
approved code to run on). The data scientist submits one request per job; once its owner
approves, each call hands it the sites' signed contributions for one round; it checks them
(:class:`privacy.key_authority.KeyAuthority`: signatures, job, round, distinct sites ≥ k,
no replay), forms the sum itself, and returns only the decrypted sum.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from datasites import job_code
from datasites.accounts import Account
from datasites.call_audit import audited_call
from datasites.datasite import Datasite
from datasites.federation_config import load_authority_key, read_config, store_paillier_key
from datasites.guard import CallRefused, guard_for
from fed_tasks.codec import PayloadError, dumps, encode_array, loads
from fed_tasks.encoding import codec_for
from fed_tasks.spec import JobSpec
from privacy.key_authority import KeyAuthority, KeyAuthorityError
from privacy.paillier import (
    PackingLayout,
    PaillierError,
    fingerprint,
    generate_keypair,
    public_key_to_str,
)

KEYRING = "keyring"


class KeyAuthoritySite(Datasite):
    """A datasite whose only asset is the authority's key fingerprint."""

    holds_data = False  # no dataset: no dataset policy or privacy budget to apply

    @classmethod
    def provision_authority(cls, name: str, directory: str | Path, scientist: Account,
                            key_bits: int = 2048) -> KeyAuthoritySite:
        public, private_key = generate_keypair(key_bits)
        fp = fingerprint(public)
        private = {KEYRING: pd.DataFrame({"key_fingerprint": [fp]})}
        mocks = {KEYRING: pd.DataFrame({"key_fingerprint": ["mock"]})}
        site = cls._provision(name, directory, scientist, None, private, mocks,
                              f"Key authority {name}: decrypts only checked sums.")
        store_paillier_key(site.directory, private_key)
        site.public_key = public_key_to_str(public)
        return site

    def parse_request(self, source: str) -> JobSpec:
        return job_code.parse_request(source, self.name, kind="authority")

    def call_limits(self, spec: JobSpec) -> dict[str, int]:
        """One decryption for the statistics, one per training round."""
        return {"decrypt": spec.rounds + 1}


def _authority(directory: Path, spec: JobSpec, action: str) -> KeyAuthority:
    config = read_config(directory)
    if config is None:
        raise CallRefused("key authority has no federation configuration")
    min_sites = max(int(config["min_sites"]), spec.min_sites)
    codec = codec_for(spec, action)
    layout = PackingLayout(codec.frac_bits, codec.bound, int(config["max_sites"]))
    return KeyAuthority(load_authority_key(directory), config["sites"], min_sites,
                        spent_path=directory / f"spent_{spec.job_id}.json",
                        layout=layout)


@audited_call  # what leaves (the decrypted sum) is logged before it leaves
def run_key_authority(*, site: str, job_id: str, spec: str, keyring: pd.DataFrame,
                      action: str, payload: str) -> str:
    """Entry point of the authority's approved code (see :mod:`datasites.site_entry`)."""
    try:
        job = JobSpec.from_json(spec)
        if job.job_id != job_id or action != "decrypt":
            raise CallRefused("the authority only decrypts sums of its approved job")
        guard = guard_for(site)
        if guard.classify({KEYRING: keyring}) == "mock":
            return dumps({"status": "mock"})
        guard.authorize(job, action)
        request = loads(payload)
        what = str(request["action"])
        if what not in ("stats", "fit"):
            raise CallRefused(f"the authority does not decrypt {what!r} results")
        total = _authority(guard.directory, job, what).decrypt_sum(
            job.job_id, int(request["round"]), list(request["contributions"]),
            expected_length=int(request["length"]))
        return dumps({"status": "ok", "result": {"sum": encode_array(total)}})
    except CallRefused as exc:
        return dumps({"status": "refused", "reason": str(exc)})
    except (KeyAuthorityError, PaillierError, PayloadError, KeyError, ValueError) as exc:
        return dumps({"status": "refused", "reason": f"{type(exc).__name__}: {exc}"})

