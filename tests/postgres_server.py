"""A throwaway PostgreSQL cluster for tests, from Debian's binaries (`apt-get install postgresql`).

It listens on a free port of 127.0.0.1 with its socket in a private temp dir, and nothing of the
system's own cluster is touched. initdb refuses to run as root, so as root the cluster runs as
the ``postgres`` OS user and lives in a fresh dir under the system temp dir (pytest's tmp dirs are
root-only, 0700); otherwise it runs as the current user in ``tmp_dir``. The superuser
``postgres`` is trusted on the socket only; TCP logins (what syft uses) need a password.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import string
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PostgresServer", "PostgresNotInstalled"]

_URL_SAFE = set(string.ascii_letters + string.digits + "-._~")


class PostgresNotInstalled(RuntimeError):
    """PostgreSQL's server binaries (or, as root, the ``postgres`` OS user) are missing."""


def _bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb, pg_ctl and postgres."""
    found = [Path(d) for d in glob.glob("/usr/lib/postgresql/*/bin")
             if all((Path(d) / n).exists() for n in ("initdb", "pg_ctl", "postgres"))]
    if not found:
        raise PostgresNotInstalled(
            "PostgreSQL server binaries not found: no /usr/lib/postgresql/*/bin/{initdb,pg_ctl,"
            "postgres}; install them with `apt-get install -y postgresql` (Debian/Ubuntu)")
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running cluster; superuser ``postgres`` over the socket in ``socket_dir``."""

    bin_dir: Path
    data_dir: Path
    socket_dir: Path
    port: int
    run_as: str | None  # OS user to run the binaries as (root only), else the current user
    owned_dirs: list[Path] = field(default_factory=list)  # removed by stop()

    @classmethod
    def start(cls, tmp_dir: Path, max_connections: int = 300) -> PostgresServer:
        """initdb a new cluster and start it on a free port; raises
        :class:`PostgresNotInstalled` or ``RuntimeError`` (with the server log's tail)."""
        bin_dir = _bin_dir()
        socket_dir = Path(tempfile.mkdtemp(prefix="pgsock-"))  # short: unix paths < 108 bytes
        owned = [socket_dir]
        run_as = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresNotInstalled(
                    "running as root needs the `postgres` OS user (initdb refuses root); "
                    "install PostgreSQL with `apt-get install -y postgresql`") from None
            run_as = "postgres"
            base = Path(tempfile.mkdtemp(prefix="pgdata-"))
            owned.append(base)
            for d in (socket_dir, base):
                os.chown(d, pw.pw_uid, pw.pw_gid)
        else:
            base = Path(tmp_dir)
            base.mkdir(parents=True, exist_ok=True)
        data_dir = base / "data"
        server = cls(bin_dir, data_dir, socket_dir, 0, run_as, owned)
        server._run("initdb", "-D", str(data_dir), "-U", "postgres", "-E", "UTF8", "--no-sync",
                    "--auth-local=trust", "--auth-host=scram-sha-256")
        for _attempt in range(5):  # another process may take the free port before we bind it
            server.port = _free_port()
            options = (f"-p {server.port} -k {socket_dir} -c listen_addresses=127.0.0.1 "
                       f"-c max_connections={max_connections} -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off")
            done = server._run("pg_ctl", "-D", str(data_dir), "-l", str(base / "postgres.log"),
                               "-w", "-t", "60", "-o", options, "start", check=False)
            if done.returncode == 0:
                return server
        log = base / "postgres.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        server.stop()
        raise RuntimeError(f"PostgreSQL did not start (pg_ctl: {done.stdout.strip()}):\n{tail}")

    def url(self, db: str, user: str, password: str) -> str:
        """The ``postgresql://`` URL syft's ``db_url`` takes (TCP, password auth).

        syft parses it with ``urlparse`` and never percent-decodes it, so the parts must be
        URL-safe as they are: ``ValueError`` otherwise."""
        for what, part in (("database", db), ("user", user), ("password", password)):
            if not part or not set(part) <= _URL_SAFE:
                raise ValueError(f"{what} {part!r}: use only letters, digits and -._~ "
                                 "(syft does not percent-decode its db_url)")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str, user: str, password: str) -> str:
        """Create login role ``user`` (or reset its password) and database ``name`` it owns;
        returns :meth:`url`."""
        url = self.url(name, user, password)  # validates the names first
        ident, lit = _ident, _literal
        self.sql(f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = {lit(user)})"
                 f" THEN CREATE ROLE {ident(user)} LOGIN; END IF; END $$;",
                 f"ALTER ROLE {ident(user)} PASSWORD {lit(password)};",
                 f"CREATE DATABASE {ident(name)} OWNER {ident(user)};")
        return url

    def sql(self, *statements: str, db: str = "postgres") -> str:
        """Run statements (each in its own transaction) as the superuser with psql; its stdout."""
        args = ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
                "-p", str(self.port), "-U", "postgres", "-d", db]
        for statement in statements:
            args += ["-c", statement]
        return self._run(*args).stdout

    def stop(self) -> None:
        """Stop the cluster (fast shutdown, disconnecting clients) and remove its temp dirs."""
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False)
        for d in self.owned_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        path = self.bin_dir / tool
        cmd = [str(path if path.exists() else tool), *args]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd="/",
                              env={**os.environ, "LC_ALL": "C.UTF-8", "PGTZ": "UTC"})
        if check and done.returncode:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}")
        return done


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
