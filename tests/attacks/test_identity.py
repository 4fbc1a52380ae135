"""Attack: a syft user changes her e-mail to pass as someone else (issue 10, section 3
"Identity", and "Logged at once" for account changes).

Syft 0.9.5 lets any user rename her own account (``client.account.set_email``; syft refuses
only an e-mail another *syft* account holds). So the dataset policy binds its allowed
submitters to the syft account's verify key (which signs every request), the audit log
names each requester by that key (``actor_id``) and by the e-mail the site first recorded,
every account change the site can see is logged, and the compliance officer's e-mail (the
officer is no syft user, so syft would let anyone take it) is reserved.

One site of its own (module scope): the tests rename accounts, which must not leak into
the session federation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from datasites.adapter.scientist import ScientistSession
from datasites.adapter.syft_server import ServiceRole, SyftException
from datasites.errors import AuthenticationError, ProvisioningError
from datasites.governance.accounts import Account, Role
from datasites.governance.audit import Action
from datasites.governance.compliance import AuditorSession
from datasites.governance.policy import DatasetPolicy, Requester, Submitter
from fed_tasks.interface import SiteRefusedError
from fed_tasks.spec import JobSpec

SITE = "ident-1"
SCIENTIST = Account("eve@attacker.org", Role.DATA_SCIENTIST, "scientist-pass-1", "Eve")


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, rounds=2, **kw)


@pytest.fixture(scope="module")
def site(partitions, schema, tmp_path_factory):
    from datasites.runtime.datasite import Datasite

    train, test = partitions[0]
    s = Datasite.provision(SITE, tmp_path_factory.mktemp("identity") / SITE, train=train,
                           test=test, schema=schema, scientist=SCIENTIST)
    yield s
    s.close()


@pytest.fixture(scope="module")
def admin(site):
    root = site.accounts[Role.ADMIN]
    return site.login(root.email, root.password)


@pytest.fixture(scope="module")
def eve(site):
    """The data scientist's own syft client (she renames herself with it)."""
    return site.login(SCIENTIST.email, SCIENTIST.password)


def _user(site, email: str):
    """The syft account holding ``email``, from syft's own store (its API hides the key)."""
    users = site.server.services.user.stash.get_all(site.server.verify_key).unwrap()
    return next(u for u in users if u.email == email)


def _key(site, email: str) -> str:
    return str(_user(site, email).verify_key)


def _register(admin, email: str, password: str = "alice-pass-123") -> None:
    res = admin.users.create(email=email, name=email.split("@")[0], password=password,
                             password_verify=password, role=ServiceRole.DATA_SCIENTIST)
    assert getattr(res, "email", None) == email, res


def _entries(site, action: str, **params) -> list[dict]:
    return [e for e in site.guard.audit.entries(action=action)
            if all(e["params"].get(k) == v for k, v in params.items())]


@contextlib.contextmanager
def _renamed(client, email: str) -> Iterator[None]:
    """``client``'s user renames her own account (as she would), and back afterwards."""
    before = client.account.email
    client.account.set_email(email)
    try:
        yield
    finally:
        client.account.set_email(before)


@contextlib.contextmanager
def _policy(site, **changes) -> Iterator[None]:
    site.set_policy(reason="identity test", **changes)
    try:
        yield
    finally:
        site.set_policy(DatasetPolicy(), reason="identity test over")


def test_submitter_check_compares_ids_not_emails(schema):
    """A policy holding alice's id refuses a requester who merely carries her e-mail."""
    alice = Submitter(email="Alice@Lab.org", user_id="a1" * 32)
    policy = DatasetPolicy(allowed_submitters=(alice,))
    spec = _spec(schema)
    assert policy.violations(spec, Requester("a1" * 32, "whatever@x.org")) == []
    assert policy.violations(spec, "a1" * 32) == []  # as the approval record keeps it
    for impostor in (Requester("e5" * 32, "alice@lab.org"), "alice@lab.org"):
        assert "may not submit" in "".join(policy.violations(spec, impostor))
    # an e-mail the owner gave that no account held when it was set matches nobody
    unbound = DatasetPolicy(allowed_submitters=("pi@lab.org",))
    assert "may not submit" in "".join(unbound.violations(spec, Requester("e5" * 32,
                                                                          "pi@lab.org")))
    assert "matches nobody" in unbound.plain_words()


def test_account_registered_later_is_logged_and_bound_by_the_policy(site, admin, schema):
    """The owner names alice by e-mail; the site binds the syft account behind it."""
    _register(admin, "alice@uni.edu")
    site.requests()  # the owner looks at the site: the new account is noticed
    key = _key(site, "alice@uni.edu")
    [registered] = _entries(site, Action.USER_REGISTERED, email="alice@uni.edu")
    assert registered["params"]["actor_id"] == key
    assert registered["params"]["seen_in"] == "syft user list"
    site.set_policy(allowed_submitters=("alice@uni.edu",), reason="study 42 is alice's")
    try:
        assert site.policy().allowed_submitters == (Submitter(email="alice@uni.edu",
                                                              user_id=key),)
        site.set_policy(max_rounds=50, reason="another field")  # the binding is kept
        assert site.policy().submitter_ids() == {key}
    finally:
        site.set_policy(DatasetPolicy(), reason="test over")


def test_scientist_renamed_to_an_allowed_submitter_is_refused_and_logged(site, admin, eve,
                                                                         schema):
    """Alice (allowed) moves to a new e-mail; Eve (not allowed) takes alice's old one with
    syft's own API and submits. Refused at review and approval; both renames logged."""
    _register(admin, "bob@uni.edu")
    bob = site.login("bob@uni.edu", "alice-pass-123")
    with pytest.raises(SyftException, match="already exists"):
        eve.account.set_email("bob@uni.edu")  # syft refuses an e-mail another account holds
    eve_key, bob_key = _key(site, SCIENTIST.email), _key(site, "bob@uni.edu")
    with _policy(site, allowed_submitters=("bob@uni.edu",)), \
            _renamed(bob, "bob@new-uni.edu"), _renamed(eve, "bob@uni.edu"):
        assert eve.account.email == "bob@uni.edu"  # syft accepted Eve's rename
        spec = _spec(schema)
        rid = ScientistSession(eve).submit(spec)
        review = site.review(rid)
        assert any("may not submit" in v for v in review.violations)
        assert "POLICY VIOLATIONS" in review.plain_words()
        with pytest.raises(PermissionError, match="may not submit"):
            site.approve(rid)
        assert site.guard.approval(spec.job_id) is None
        assert (review.requester, review.requester_id) == (SCIENTIST.email, eve_key)
        # both renames are on record, with the stable ids
        assert _entries(site, Action.USER_CHANGED, field="email", old=SCIENTIST.email,
                        new="bob@uni.edu", actor_id=eve_key)
        assert _entries(site, Action.USER_CHANGED, field="email", old="bob@uni.edu",
                        new="bob@new-uni.edu", actor_id=bob_key)
        [submitted] = [e for e in site.guard.audit.entries(action=Action.REQUEST_SUBMITTED)
                       if e["objects"]["request_id"] == rid]
        assert submitted["actor"] == SCIENTIST.email  # not the e-mail she borrowed
        assert submitted["params"]["actor_id"] == eve_key
        assert submitted["params"]["requester_email"] == "bob@uni.edu"
        # bob, renamed, is still the allowed submitter: the policy holds his id
        bob_spec = _spec(schema)
        bob_rid = ScientistSession(bob).submit(bob_spec)
        assert site.review(bob_rid).violations == ()
        site.approve(bob_rid, reason="bob's study")
        request = site.guard.approval(bob_spec.job_id)["request"]
        assert (request["requester"], request["requester_email"]) == (bob_key, "bob@uni.edu")
        approved = site.guard.audit.entries(action=Action.REQUEST_APPROVED)[-1]
        assert approved["params"]["requester_id"] == bob_key
        assert approved["params"]["actor_id"] == str(site.owner_client().credentials.verify_key)


def test_every_call_checks_the_requester_id(site, eve, schema):
    """A job approved under an open policy stops once the owner allows only someone else,
    whatever e-mail its submitter holds: the call-time check compares the recorded id."""
    spec = _spec(schema)
    session = ScientistSession(eve)
    site.approve(session.submit(spec), reason="open policy")
    eve_key = _key(site, SCIENTIST.email)
    assert site.guard.approval(spec.job_id)["request"]["requester"] == eve_key
    with _policy(site, allowed_submitters=("bob@uni.edu",)):
        with pytest.raises(SiteRefusedError, match="may not submit"):
            session.connection(spec).call("stats", {})
    assert site.guard.approval(spec.job_id)["used"]["stats"] == 0


def test_officer_email_cannot_be_taken_by_a_syft_user(site, eve, schema):
    """The officer is not a syft user, so syft lets Eve rename herself to the officer's
    e-mail. The site logs it, refuses her requests, and no login path takes her for the
    officer (nor the officer's path her syft password)."""
    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    eve_key = _key(site, SCIENTIST.email)
    with _renamed(eve, officer.email):
        rid = ScientistSession(eve).submit(_spec(schema))
        review = site.review(rid)
        assert any("reserved for this site's compliance officer" in v
                   for v in review.violations)
        with pytest.raises(PermissionError, match="reserved for this site's compliance"):
            site.approve(rid)
        [taken] = _entries(site, Action.USER_CHANGED, new=officer.email, actor_id=eve_key)
        assert taken["params"]["reserved_for"] == "compliance_officer"
        assert officer.email not in {r.requester for r in site.requests()}
        with pytest.raises(AuthenticationError):  # the officer's path: officer.json only
            AuditorSession.login(site.directory, officer.email, SCIENTIST.password)
        with pytest.raises(AuthenticationError, match="compliance officer"):
            site.login(officer.email, SCIENTIST.password)
        assert AuditorSession.login(site.directory, officer.email, officer.password).verify().ok


def test_account_registered_under_the_officer_email_is_flagged(site, admin):
    """The admin registers an account under the officer's e-mail (case changed: the site
    compares e-mails case-insensitively); the site flags it, and removing it is logged."""
    officer = site.accounts[Role.COMPLIANCE_OFFICER]
    local, domain = officer.email.split("@")
    lookalike = f"{local.upper()}@{domain}"  # syft lower-cases only the domain
    _register(admin, lookalike, "officer-lookalike-1")
    try:
        site.requests()
        [flagged] = _entries(site, Action.USER_REGISTERED, email=lookalike)
        assert flagged["params"]["reserved_for"] == "compliance_officer"
        with pytest.raises(AuthenticationError):
            AuditorSession.login(site.directory, officer.email, "officer-lookalike-1")
        with pytest.raises(AuthenticationError, match="compliance officer"):
            site.login(lookalike, "officer-lookalike-1")
    finally:
        admin.api.services.user.delete(uid=_user(site, lookalike).id)
    site.requests()
    assert _entries(site, Action.USER_REMOVED, email=lookalike)


def test_provisioning_refuses_a_syft_account_under_the_officer_email(partitions, schema,
                                                                     tmp_path):
    from datasites.runtime.datasite import Datasite

    train, test = partitions[1]
    directory = tmp_path / "ident-2"
    with pytest.raises(ProvisioningError, match="reserved"):
        Datasite.provision("ident-2", directory, train=train, test=test, schema=schema,
                           scientist=SCIENTIST, owner_email="same@ident-2.site",
                           officer_email="same@ident-2.site")
    assert not directory.exists() or not any(directory.iterdir())
