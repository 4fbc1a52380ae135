"""Accounts of a site and how passwords reach the code: never from files or argv.

Also the site's record of its syft accounts (:class:`UserRegistry`): syft reports no account
change, so the site compares its user list against this record to notice and log them.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from datasites.runtime.site_files import MIN_PASSWORD_LENGTH, write_private


class Role(StrEnum):
    ADMIN = "admin"
    DATA_OWNER = "data_owner"
    DATA_SCIENTIST = "data_scientist"
    COMPLIANCE_OFFICER = "compliance_officer"  # fedsyft-level, read-only: not a syft user


class Secret(str):
    """A password: an ordinary ``str`` for every use, but its ``repr`` hides it.

    Why: tracebacks with local variables, ``%r`` logging, pytest's assertion output and
    dataclass/dict reprs all go through ``repr``; a secret held in this type never reaches
    the screen that way. ``f"{secret}"`` and :meth:`reveal` still give the value, for the
    few places that must hand it on (syft, scrypt) or show a random one once.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "Secret('********')"

    def reveal(self) -> str:
        """The value as a plain ``str`` (for libraries that check the exact type)."""
        return str.__str__(self)


class WeakPasswordError(ValueError):
    """A chosen password is shorter than :data:`MIN_PASSWORD_LENGTH`."""


def check_password(password: str, what: str) -> Secret:
    """``password`` as a :class:`Secret` if it is strong enough, else raise
    :class:`WeakPasswordError` naming ``what`` (a variable or parameter name).

    Owners and officers are held to the same rule: an owner approves code that runs on the
    private table, so her password is worth at least as much as the read-only officer's.
    """
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPasswordError(f"{what} must have at least {MIN_PASSWORD_LENGTH} characters "
                                f"(it has {len(password)})")
    return Secret(password)


def new_password() -> Secret:
    """A random password for a provisioned account (never syft's default)."""
    return Secret(secrets.token_urlsafe(18))


@dataclass(frozen=True)
class Account:
    """One account of a site; ``password`` is kept as a :class:`Secret` and out of the repr."""

    email: str
    role: Role
    password: str = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.password, Secret):
            object.__setattr__(self, "password", Secret(self.password))


def password_from_env(var: str) -> Secret | None:
    """Passwords for CLI use come from environment variables or an interactive prompt."""
    value = os.environ.get(var)
    return Secret(value) if value else None


# ---- syft accounts as the site last saw them ----------------------------------------------
USERS_FILE = "users.json"
USERS_FORMAT = "fedsyft-users/1"


@dataclass(frozen=True)
class SyftUser:
    """One syft account. ``user_id`` (syft's UID) never changes; ``verify_key`` (hex) signs
    the user's requests and is what policies bind to; ``email`` the user may change."""

    user_id: str
    email: str
    verify_key: str
    role: str


@dataclass(frozen=True)
class UserChange:
    """What differs between syft's user list and the site's record: ``field`` is
    ``"registered"``, ``"removed"``, ``"email"``, ``"verify_key"`` or ``"role"``."""

    user: SyftUser
    field: str
    old: str = ""
    new: str = ""


class UserRegistry:
    """The syft accounts a site has recorded (``users.json``, 0600), so that it notices what
    syft does not report: a new account, a changed e-mail, key or role.

    Each record also keeps ``registered_email``, the first e-mail the site saw for that
    account: the readable audit actor that stays the same whatever the user renames to.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / USERS_FILE
        self._users: dict[str, dict[str, str]] = {}
        self.exists = self.path.exists()
        if self.exists:
            try:
                doc = json.loads(self.path.read_text())
                if doc.get("format") != USERS_FORMAT or not isinstance(doc.get("users"), dict):
                    raise ValueError(f"not a {USERS_FORMAT} file")
                self._users = {str(k): dict(v) for k, v in doc["users"].items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(f"user record {self.path} is unreadable: {exc}") from None

    def by_key(self, verify_key: str) -> dict[str, str] | None:
        """The record of the account whose verify key is ``verify_key`` (None: unknown)."""
        return next(({**u, "user_id": uid} for uid, u in self._users.items()
                     if u["verify_key"] == verify_key), None)

    def diff(self, current: list[SyftUser]) -> list[UserChange]:
        """Every change from the record to ``current`` (syft's user list now)."""
        out: list[UserChange] = []
        now = {u.user_id: u for u in current}
        for user in current:
            old = self._users.get(user.user_id)
            if old is None:
                out.append(UserChange(user, "registered", new=user.email))
                continue
            out += [UserChange(user, f, old[f], getattr(user, f))
                    for f in ("email", "verify_key", "role")
                    if old[f].lower() != getattr(user, f).lower()]
        out += [UserChange(SyftUser(uid, u["email"], u["verify_key"], u["role"]), "removed",
                           old=u["email"])
                for uid, u in self._users.items() if uid not in now]
        return out

    def save(self, current: list[SyftUser]) -> None:
        """Record ``current`` (keeping each known account's ``registered_email``)."""
        self._users = {u.user_id: {"email": u.email, "verify_key": u.verify_key, "role": u.role,
                                   "registered_email": self._users.get(u.user_id, {}).get(
                                       "registered_email", u.email)}
                       for u in current}
        doc = {"format": USERS_FORMAT, "users": self._users}
        write_private(self.path, json.dumps(doc, indent=1, sort_keys=True) + "\n")
        self.exists = True
