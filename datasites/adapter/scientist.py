"""The data scientist's view of a site: mocks, job submission, and approved calls."""

from __future__ import annotations

import linecache
import os
from pathlib import Path
from typing import Any

import pandas as pd

from datasites.adapter import job_code
from datasites.adapter.quiet import quiet
from datasites.adapter.syft_server import SyftException, sy, syft_message
from datasites.governance.policy import DatasetPolicy
from datasites.governance.receipts import append_receipt
from datasites.runtime.datasite import DATASET_NAME
from fed_tasks.codec import PayloadError, dumps, loads
from fed_tasks.interface import SiteRefusedError, SiteUnreachableError
from fed_tasks.spec import JobSpec


def _function_from_source(source: str, name: str) -> Any:
    """Compile generated source so that ``inspect.getsource`` (used by syft) can read it."""
    filename = f"<fedsyft-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own template
    return namespace[name]


RECEIPTS_ENV = "FEDSYFT_RECEIPTS"


def _first_words(exc: BaseException) -> str:
    """A connection error in a few words ("Connection refused"), not requests' nested repr."""
    text = str(exc)
    for known in ("Connection refused", "Connection aborted", "Read timed out",
                  "Remote end closed connection"):
        if known in text:
            return known
    return type(exc).__name__


class ScientistSession:
    """A data scientist logged in to one site (a syft client wrapped for fedsyft jobs).

    ``receipts``: a JSON-lines file where every released reply's signed audit head is
    appended (see :mod:`datasites.governance.receipts`); default ``$FEDSYFT_RECEIPTS``, else none
    kept.
    Keeping them lets the scientist, or anyone they hand them to, detect a later rewrite of
    the site's log with ``fedsyft audit verify --receipts``.
    """

    def __init__(self, client: Any, kind: str = "site", receipts: Path | str | None = None
                 ) -> None:
        self.client = client
        self.kind = kind  # "site" (a data holder) or "authority" (the key authority)
        self.site = str(client.name)
        self._assets: dict[str, Any] | None = None
        path = receipts if receipts is not None else os.environ.get(RECEIPTS_ENV) or None
        self.receipts: Path | None = Path(path) if path is not None else None

    def assets(self) -> dict[str, Any]:
        if self._assets is None:
            with quiet():
                datasets = [d for d in self.client.datasets if d.name == DATASET_NAME]
            if not datasets:
                raise LookupError(f"site {self.site!r} publishes no dataset {DATASET_NAME!r}")
            self._assets = {a.name: a for a in datasets[0].assets}
        return self._assets

    def dataset_description(self) -> str:
        """The dataset's description as published now (base text and the owner's policy)."""
        with quiet():
            datasets = [d for d in self.client.datasets if d.name == DATASET_NAME]
        if not datasets:
            raise LookupError(f"site {self.site!r} publishes no dataset {DATASET_NAME!r}")
        description = datasets[0].description
        return str(getattr(description, "text", description) or "")

    def policy(self) -> DatasetPolicy:
        """The data owner's current policy for the dataset, as the site publishes it.

        Read from the dataset description (no approval needed); the site enforces the
        policy whatever this returns.
        """
        policy = DatasetPolicy.from_description(self.dataset_description())
        if policy is None:
            raise LookupError(f"site {self.site!r} publishes no policy with {DATASET_NAME!r}")
        return policy

    def mock(self, split: str = "train") -> pd.DataFrame:
        """The synthetic mock of a split: all a data scientist ever sees of the rows."""
        with quiet():
            return self.assets()[split].mock

    def submit(self, spec: JobSpec) -> str:
        """Submit the job as one code request; returns the request id at this site."""
        name = job_code.function_name(spec.job_id, self.kind)
        func = _function_from_source(job_code.render(self.site, spec, self.kind), name)
        with quiet():
            policy = sy.MixedInputPolicy(client=self.client, **self.assets(), action=str,
                                         payload=str)
            syft_func = sy.syft_function(input_policy=policy,
                                         output_policy=sy.SingleExecutionExactOutput())(func)
            req = self.client.code.request_code_execution(syft_func)
        if isinstance(req, sy.SyftError):
            raise RuntimeError(f"site {self.site!r} did not accept the request: "
                               f"{syft_message(req)}")
        return req.id.no_dash

    def request_status(self, spec: JobSpec) -> str:
        """This site's decision on the scientist's request for ``spec``: ``approved``,
        ``pending``, ``denied``, or ``missing`` (never submitted here)."""
        name = job_code.function_name(spec.job_id, self.kind)
        with quiet():
            found = [r for r in self.client.requests
                     if getattr(r.code, "service_func_name", None) == name]
            if not found:
                return "missing"
            status = str(found[-1].status.name).lower()
        return {"rejected": "denied"}.get(status, status)

    def connection(self, spec: JobSpec) -> SyftJobConnection:
        return SyftJobConnection(self, spec)


class SyftJobConnection:
    """:class:`fed_tasks.interface.SiteConnection` over an approved syft code request."""

    def __init__(self, session: ScientistSession, spec: JobSpec) -> None:
        self.session = session
        self.spec = spec
        self.name = session.site
        self._func_name = job_code.function_name(spec.job_id, session.kind)

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        client, assets = self.session.client, self.session.assets()
        try:
            with quiet():
                func = getattr(client.code, self._func_name)
                out = func(**assets, action=action, payload=dumps(message))
                value = out.get() if hasattr(out, "get") else out
        except SyftException as exc:
            raise SiteRefusedError(self.name, syft_message(exc)) from None
        except AttributeError:
            raise SiteRefusedError(self.name, f"no job code {self._func_name} is visible "
                                              "(not submitted, or not yet approved)") from None
        except OSError as exc:  # requests' ConnectionError: the server is gone
            raise SiteUnreachableError(self.name, _first_words(exc)) from None
        if isinstance(value, sy.SyftError):
            raise SiteRefusedError(self.name, syft_message(value))
        try:
            envelope = loads(value)
        except PayloadError as exc:
            raise SiteRefusedError(self.name, f"unreadable reply: {exc}") from None
        if envelope.get("status") == "mock":
            raise SiteRefusedError(self.name, "the call ran on the mock only (not approved "
                                              "for the private data)")
        if envelope.get("status") != "ok":
            raise SiteRefusedError(self.name, str(envelope.get("reason")))
        head = envelope.get("audit_head")
        if self.session.receipts is not None and isinstance(head, dict):
            append_receipt(self.session.receipts, self.name, head, job_id=self.spec.job_id,
                           action=action)
        return envelope["result"]
