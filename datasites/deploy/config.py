"""``federation.toml``: where each institution's datasite lives, validated with pydantic.

Only public facts are in the file (names, loopback ports, directories, tables, account
e-mails). Passwords never are: they come from environment variables or a prompt
(:func:`password_for`).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from datasites.governance.accounts import Secret, password_from_env

NAME = r"^[a-z0-9][a-z0-9-]{0,39}$"
CONFIG_ENV = "FEDSYFT_CONFIG"  # notebooks find the federation through it


class ConfigError(ValueError):
    """A federation.toml that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberConfig(_Strict):
    """One server of the federation: a data site or the key authority."""

    name: str = Field(pattern=NAME)
    host: Literal["127.0.0.1", "localhost"] = "127.0.0.1"  # loopback only, by design
    port: int = Field(ge=1024, le=65535)
    directory: Path
    store: str = "sqlite"
    owner: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    officer: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        if value != "sqlite" and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be \"sqlite\" or a postgresql:// URL")
        return value

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class SiteConfig(MemberConfig):
    data: Path
    label_column: str = "anomaly"
    # a series site: the table's time column (rows sorted by it, never a feature); the site
    # is then evaluated on its whole series and test_fraction is unused
    time_column: str | None = None
    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)


class AuthorityConfig(MemberConfig):
    name: str = Field("key-authority", pattern=NAME)
    key_bits: int = Field(2048, ge=1024, le=4096)


class FederationSettings(_Strict):
    name: str = Field("federation", pattern=NAME)
    scientist: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")
    min_sites: int = Field(2, ge=2)
    seed: int = Field(0, ge=0)


class FederationFile(_Strict):
    """The whole file; paths are resolved against the file's own directory."""

    federation: FederationSettings
    site: list[SiteConfig] = Field(min_length=2)
    key_authority: AuthorityConfig | None = None
    path: Path = Field(Path("federation.toml"), exclude=True)

    @property
    def members(self) -> list[MemberConfig]:
        return [*self.site, *([self.key_authority] if self.key_authority else [])]

    def member(self, name: str) -> MemberConfig:
        for m in self.members:
            if m.name == name:
                return m
        raise ConfigError(f"{self.path}: no site {name!r} (sites: "
                          f"{', '.join(m.name for m in self.members)})")

    def selected(self, name: str | None) -> list[MemberConfig]:
        return self.members if name is None else [self.member(name)]


def load(path: str | Path) -> FederationFile:
    """Read and check ``path``; every problem is one :class:`ConfigError` line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    try:
        cfg = FederationFile.model_validate({**raw, "path": path.resolve()})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(_key(p, raw) for p in err["loc"]) or "file"
        raise ConfigError(f"{path}: {where}: {err['msg']}") from None
    base = path.resolve().parent
    members = [m.model_copy(update={"directory": _under(base, m.directory)})
               for m in cfg.site]
    sites = [s.model_copy(update={"data": _under(base, s.data)}) for s in members]
    authority = cfg.key_authority and cfg.key_authority.model_copy(
        update={"directory": _under(base, cfg.key_authority.directory)})
    cfg = cfg.model_copy(update={"site": sites, "key_authority": authority})
    _check_unique(cfg)
    return cfg


def _key(part: object, raw: dict) -> str:
    """A location in the file as the user wrote it (``site[2].port``)."""
    if isinstance(part, int):
        return f"[{part + 1}]"
    return str(part)


def _under(base: Path, path: Path) -> Path:
    return (base / path.expanduser()).resolve()


def _check_unique(cfg: FederationFile) -> None:
    seen: dict[str, dict[object, str]] = {"name": {}, "port": {}, "directory": {}}
    for m in cfg.members:
        for field in seen:
            value = getattr(m, field)
            if value in seen[field]:
                raise ConfigError(f"{cfg.path}: {field} {value} is used by both "
                                  f"{seen[field][value]!r} and {m.name!r}")
            seen[field][value] = m.name
    dirs = [m.directory for m in cfg.members]
    for a in dirs:
        for b in dirs:
            if a != b and a.is_relative_to(b):
                raise ConfigError(f"{cfg.path}: directory {a} lies inside {b}")
    for s in cfg.site:
        if not s.data.is_file():
            raise ConfigError(f"{cfg.path}: site {s.name!r}: data file {s.data} not found")


def _env_name(site: str) -> str:
    return re.sub(r"[^A-Z0-9]", "_", site.upper())


def password_env(role: str, site: str | None = None) -> list[str]:
    """The variables that may hold ``role``'s password, most specific first:
    ``FEDSYFT_OWNER_PASSWORD_SITE_1``, then ``FEDSYFT_OWNER_PASSWORD``."""
    base = f"FEDSYFT_{role.upper()}_PASSWORD"
    return ([f"{base}_{_env_name(site)}"] if site else []) + [base]


def member_credentials(config: str | Path | FederationFile, site: str, role: str,
                       email: str | None = None, password: str | None = None
                       ) -> tuple[MemberConfig, str, str]:
    """(member, e-mail, password) of ``role`` ("owner" | "officer") at ``site``: the e-mail
    from the config unless given, the password from ``FEDSYFT_{ROLE}_PASSWORD[_SITE]`` or a
    prompt unless given."""
    cfg = config if isinstance(config, FederationFile) else load(config)
    member = cfg.member(site)
    return (member, email or getattr(member, role),
            password or password_for(role, site))


def password_for(role: str, site: str | None = None, *, prompt: bool = True) -> Secret:
    """A password from the environment, else a hidden prompt (a terminal only)."""
    import sys

    names = password_env(role, site)
    for name in names:
        value = password_from_env(name)
        if value is not None:
            return value
    if prompt and sys.stdin.isatty():
        import getpass

        who = f"{role} of {site}" if site else role
        value = getpass.getpass(f"password of the {who}: ")
        if value:
            return Secret(value)
    raise ConfigError(f"no password for the {role}" + (f" of site {site!r}" if site else "")
                      + f": set {names[0]}" + (f" or {names[1]}" if len(names) > 1 else ""))
