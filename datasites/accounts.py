"""Accounts of a site and how passwords reach the code: never from files or argv."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    DATA_OWNER = "data_owner"
    DATA_SCIENTIST = "data_scientist"
    COMPLIANCE_OFFICER = "compliance_officer"  # fedsyft-level, read-only: not a syft user


def new_password() -> str:
    """A random password for a provisioned account (never syft's default)."""
    return secrets.token_urlsafe(18)


@dataclass(frozen=True)
class Account:
    email: str
    role: Role
    password: str = field(repr=False)
    name: str = ""


def password_from_env(var: str) -> str | None:
    """Passwords for CLI use come from environment variables or an interactive prompt."""
    value = os.environ.get(var)
    return value or None
