"""The orchestrator relays the secure sum's key directory: can it put in keys of its own?

If it could substitute its own keys for every other site's, it would hold all of a site's
pairwise seeds and the whole federation key, and unmask that site's input. Key adverts are
signed with each site's contribution key and checked against the member keys in the site's
own federation config, so a substituted or unsigned advert stops the setup.
"""

from __future__ import annotations

import pytest

from datasites.runtime.direct import direct_federation
from fed_tasks.encoding import secagg_plan
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec
from privacy import signing
from privacy.secagg_session import SecAggSessionClient, SecAggSessionServer


@pytest.fixture()
def three_sites(tmp_path, shuttle_small, schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1,
                   aggregation="secagg")
    frames = {f"node-{i}": (shuttle_small.iloc[i::3].iloc[:-50].reset_index(drop=True),
                            shuttle_small.iloc[i::3].iloc[-50:].reset_index(drop=True))
              for i in range(3)}
    sites = direct_federation(tmp_path, spec, frames)
    yield spec, sites
    for s in sites:
        s.close()


def _impostor(spec: JobSpec, name: str, sign=None) -> str:
    """An advert the orchestrator makes up for site ``name`` (it holds the secret keys)."""
    plan = secagg_plan(spec, 3)
    fake = SecAggSessionClient(name, job_id=spec.job_id, threshold=plan["threshold"],
                               bits=plan["bits"], vector_length=plan["vector_length"],
                               rounds=plan["rounds"])
    return fake.advertise(sign=sign).to_str()


@pytest.mark.parametrize("signer", ["none", "orchestrator's own key"])
def test_a_substituted_key_advert_stops_the_setup(three_sites, signer):
    spec, sites = three_sites
    adverts = [s.call("secagg_advertise", {})["advert"] for s in sites]
    key = signing.generate_signing_key()
    sign = None if signer == "none" else key.sign
    adverts[1] = _impostor(spec, sites[1].name, sign)  # "site 1" is now the orchestrator
    plan = secagg_plan(spec, 3)
    server = SecAggSessionServer(plan["threshold"], plan["bits"], plan["vector_length"],
                                 spec.job_id, plan["rounds"])
    directory = server.collect_keys(adverts).to_str()
    with pytest.raises(SiteRefusedError, match="not signed or its signature does not verify"):
        sites[0].call("secagg_share", {"directory": directory})


def test_the_genuine_directory_is_accepted(three_sites):
    spec, sites = three_sites
    adverts = [s.call("secagg_advertise", {})["advert"] for s in sites]
    plan = secagg_plan(spec, 3)
    server = SecAggSessionServer(plan["threshold"], plan["bits"], plan["vector_length"],
                                 spec.job_id, plan["rounds"])
    directory = server.collect_keys(adverts).to_str()
    assert all("shares" in s.call("secagg_share", {"directory": directory}) for s in sites)
