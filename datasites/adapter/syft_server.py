"""Starting and logging into a PySyft 0.9.5 datasite (the only syft-specific plumbing).

We build the server ourselves rather than through ``sy.orchestra.launch`` because a named
orchestra server derives its signing key — and with it the root identity — from the
server's *name*; ours get a random key and the root password chosen at provisioning, and
keep their store in the site's own directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasites.adapter.quiet import quiet, silence_syft_logging
from datasites.errors import AuthenticationError
from datasites.runtime.site_files import make_private_directory, open_private, write_private

silence_syft_logging()

import syft as sy  # noqa: E402
from syft.server.credentials import SyftSigningKey  # noqa: E402
from syft.server.datasite import Datasite as SyftDatasite  # noqa: E402
from syft.service.user.user_roles import ServiceRole  # noqa: E402
from syft.store.blob_storage.on_disk import (  # noqa: E402
    OnDiskBlobStorageClientConfig,
    OnDiskBlobStorageConfig,
)
from syft.types.errors import SyftException  # noqa: E402
from syft.types.uid import UID  # noqa: E402

__all__ = ["sy", "ServiceRole", "SyftException", "start_server", "stop_server", "login",
           "login_http", "STORE_URL_FILE",
           "http_app", "syft_message", "watch_refusals"]


STORE_URL_FILE = "store_url"  # a PostgreSQL store's URL, with its password: 0600, like the keys


def store_url(directory: Path) -> str | None:
    """The site's PostgreSQL store URL (None: the sqlite store in the directory)."""
    path = Path(directory) / STORE_URL_FILE
    return path.read_text().strip() if path.exists() else None


def _without_password(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.username or ''}@{parts.hostname}:{parts.port}{parts.path}"


def _key(directory: Path) -> SyftSigningKey:
    """The site's server signing key, random and kept 0600 in the site directory."""
    path = directory / "server_signing_key"
    if path.exists():
        return SyftSigningKey.from_string(path.read_text().strip())
    key = SyftSigningKey.generate()
    write_private(path, str(key))
    return key


def _uid(directory: Path) -> UID:
    path = directory / "server_uid"
    if not path.exists():
        write_private(path, UID().no_dash)
    return UID(path.read_text().strip())


def _precreate_store(path: Path) -> None:
    """Create the sqlite file 0600 before syft opens it.

    sqlite would create it 0644 minus the umask, and gives its ``-wal``/``-shm``/``-journal``
    files the database file's own mode, so an empty owner-only file (a valid empty database)
    keeps the whole store, which holds the private table in clear, owner-only from the start.
    """
    if not path.exists():
        os.close(open_private(path, os.O_WRONLY | os.O_CREAT))


def start_server(name: str, directory: Path, root_email: str, root_password: str,
                 reset: bool) -> Any:
    """Start an in-process datasite whose store lives in ``directory``.

    Everything it needs to restart is there: ``syft.db``, the signing key, the uid and the
    blob store (syft's default blob store is under /tmp, which does not survive a reboot).
    With ``reset=False`` the existing root account is kept and ``root_password`` is unused.
    """
    make_private_directory(directory)
    make_private_directory(directory / "blob")  # syft writes blobs with the umask's mode
    postgres = store_url(directory)
    if postgres is None:
        _precreate_store(directory / "syft.db")
    blobs = OnDiskBlobStorageConfig(
        client_config=OnDiskBlobStorageClientConfig(base_directory=directory / "blob"),
        min_blob_size=1)  # MB, syft's default: larger objects go to the blob store
    try:
        with quiet():  # syft prints (and logs) the store URL, password included
            return SyftDatasite(
                name=name, id=_uid(directory), signing_key=_key(directory),
                root_email=root_email, root_password=_plain(root_password),
                db_url=postgres or f"sqlite:///{directory / 'syft.db'}", reset=reset,
                deployment_type="python", in_memory_workers=True, blob_storage_config=blobs,
            )
    except Exception as exc:
        if postgres is None:
            raise
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300]
        reason = reason.replace(postgres, _without_password(postgres))
        raise StoreError(f"site {name!r}: cannot open its PostgreSQL store "
                         f"{_without_password(postgres)}: {reason}") from None


class StoreError(RuntimeError):
    """A site store that cannot be opened (the message never holds its password)."""


def stop_server(server: Any) -> None:
    """Stop a datasite and close its store's connections (syft's ``stop`` leaves the
    database pool open: one idle PostgreSQL connection per stop)."""
    with quiet():
        server.stop()
    _forget(server)
    engine = getattr(getattr(server, "db", None), "engine", None)
    if engine is not None:
        engine.dispose()


def _forget(server: Any) -> None:
    """Drop the process-wide syft registries' entries for a stopped server.

    Why: syft keys its API and server-context registries by server uid and user key, and a
    site keeps its uid when it is reopened (after provisioning moves it into place, or a
    restart in the same process). A stale entry wins over the reopened server: code running
    in the new server then reads assets through the old one (its store closed, its files
    moved), and the call fails with syft's "error retrieving data"."""
    from syft.client.api import APIRegistry
    from syft.client.client import SyftClientSessionCache
    from syft.server.server import AuthServerContextRegistry

    uid = server.id
    apis = APIRegistry.__api_registry__
    for key in [k for k in apis if k[0] == uid]:
        del apis[key]
    contexts = AuthServerContextRegistry.__server_context_registry__
    for key in [k for k in contexts if k.startswith(f"{uid}-")]:
        del contexts[key]
    clients = SyftClientSessionCache.__client_cache__
    for key in [k for k, c in clients.items() if getattr(c, "id", None) == uid]:
        del clients[key]
    stores = SyftClientSessionCache.__credentials_store__
    for key in [k for k, c in stores.items() if getattr(c, "id", None) == uid]:
        del stores[key]


def login(server: Any, email: str, password: str, site: str) -> Any:
    """A logged-in client, or :class:`AuthenticationError` naming the site and account."""
    try:
        with quiet():
            return server.get_guest_client(verbose=False).login(email=email,
                                                                password=_plain(password))
    except SyftException as exc:
        detail = syft_message(exc)
        if detail in ("Item not found.", "Invalid credentials."):
            detail = "wrong email or password"
        raise AuthenticationError(
            f"cannot log in to site {site!r} as {email!r}: {detail}") from None


def login_http(host: str, port: int, email: str, password: str, site: str) -> Any:
    """A client of a datasite served over HTTP (``fedsyft up``), logged in with syft's own
    ``sy.login``; :class:`AuthenticationError` for wrong credentials or a site that does not
    answer, naming the site and its URL."""
    url = f"http://{host}"
    try:
        with quiet():
            return sy.login(url=url, port=port, email=email, password=_plain(password),
                            cache=False)
    except SyftException as exc:
        detail = syft_message(exc)
        if detail in ("Item not found.", "Invalid credentials."):
            detail = "wrong email or password"
        raise AuthenticationError(f"cannot log in to site {site!r} at {url}:{port} as "
                                  f"{email!r}: {detail}") from None
    except Exception as exc:  # noqa: BLE001 - requests' errors: the site is not answering
        raise AuthenticationError(f"site {site!r} at {url}:{port} does not answer "
                                  f"({type(exc).__name__}); is it up? (fedsyft status)"
                                  ) from None


def http_app(server: Any, routers: dict[str, Any], on_shutdown: Callable[[], None]) -> Any:
    """The FastAPI app a hosted datasite serves: syft's own routes under ``/api/v2`` (what
    ``sy.login`` speaks) plus fedsyft's ``routers`` (prefix → APIRouter)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from syft.server.routes import make_routes

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        try:
            yield
        finally:
            on_shutdown()

    app = FastAPI(title=str(server.name), lifespan=lifespan)
    app.include_router(make_routes(worker=server), prefix="/api/v2")
    for prefix, router in routers.items():
        app.include_router(router, prefix=prefix)
    return app


def _plain(password: str) -> str:
    """An exact ``str`` for syft, whose serde looks types up exactly (a
    :class:`datasites.governance.accounts.Secret` is a ``str`` subclass)."""
    return str.__str__(password)


def syft_message(obj: Any) -> str:
    """The human part of a syft exception or SyftError."""
    text = getattr(obj, "public_message", None) or getattr(obj, "message", None) or str(obj)
    return str(text).strip()


#: ``on_refused(verify_key_hex, path, message)``: a scientist's syft call syft refused
RefusalHook = Callable[[str, str, str], None]


def watch_refusals(server: Any, on_refused: RefusalHook) -> None:
    """Report every API call of a user below data owner that syft refuses (an error result
    or exception), so the site's audit log holds what syft itself turned away — e.g. a
    scientist's ``.get()`` of a private asset or a call of code not yet approved.

    Wraps this server instance's API entry point; reporting never changes the answer."""
    original = server.handle_api_call_with_unsigned_result

    def report(api_call: Any, message: str) -> None:
        try:
            key = api_call.credentials
            if server.get_role_for_credentials(credentials=key).value >= \
                    ServiceRole.DATA_OWNER.value:
                return
            path = str(getattr(api_call.message, "path", "?"))
            on_refused(str(key), path, message)
        except Exception:  # noqa: BLE001 - the audit of a refusal must not break syft
            pass

    def handle(api_call: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = original(api_call, *args, **kwargs)
        except SyftException as exc:
            report(api_call, syft_message(exc))
            raise
        if isinstance(result, sy.SyftError):
            report(api_call, syft_message(result))
        return result

    server.handle_api_call_with_unsigned_result = handle
