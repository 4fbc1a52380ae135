"""The long-running server process of one hosted datasite (what ``fedsyft up`` starts).

``python -m datasites.deploy.serve DIRECTORY --port N`` opens the provisioned site in
``DIRECTORY`` (store, keys, guard, ledger, audit chain: all from the directory, so a restart
after ``kill -9`` continues where it stopped) and serves syft's API and fedsyft's routes on
127.0.0.1 only. Approved job code runs in this process, where the site's guard is. SIGTERM
stops it cleanly (the site is closed, ``server_stopped`` logged).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PID_FILE = "server.pid"
STOPPED_FILE = "server.stopped"  # written at a clean stop, removed at the next start
LOG_FILE = "server.log"


def _previous_stop(directory: Path) -> str:
    if (directory / STOPPED_FILE).exists():
        return "clean"
    return "unclean" if (directory / PID_FILE).exists() else "first"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsyft-site-server")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--host", default="127.0.0.1", choices=["127.0.0.1", "localhost"])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    directory = args.directory.resolve()
    url = f"http://{args.host}:{args.port}"

    import uvicorn

    from datasites.adapter.syft_server import http_app
    from datasites.deploy.site_api import router
    from datasites.governance.audit import Action
    from datasites.governance.audit import Role as AuditRole
    from datasites.runtime.datasite import SYSTEM_ACTOR
    from datasites.runtime.federation_config import PAILLIER_KEY_FILE
    from datasites.runtime.key_authority_site import KeyAuthoritySite
    from datasites.runtime.site_files import write_private

    kind = KeyAuthoritySite if (directory / PAILLIER_KEY_FILE).exists() else None
    from datasites.runtime.datasite import Datasite

    previous = _previous_stop(directory)
    site = (kind or Datasite).host(directory)
    (directory / STOPPED_FILE).unlink(missing_ok=True)
    write_private(directory / PID_FILE, f"{os.getpid()}\n")
    site.guard.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, Action.SERVER_STARTED,
                            objects={"site": site.name},
                            params={"url": url, "pid": os.getpid(), "previous_stop": previous})
    logging.getLogger(__name__).info("site %s serving at %s (previous stop: %s)", site.name,
                                     url, previous)

    stopped = False

    def shutdown() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        site.guard.audit.append(SYSTEM_ACTOR, AuditRole.SYSTEM, Action.SERVER_STOPPED,
                                objects={"site": site.name},
                                params={"url": url, "pid": os.getpid()})
        site.close()
        write_private(directory / STOPPED_FILE, f"{os.getpid()}\n")
        (directory / PID_FILE).unlink(missing_ok=True)

    app = http_app(site.server, {"/fedsyft/v1": router(site, url)}, on_shutdown=shutdown)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=10)
    finally:  # a port taken meanwhile ends uvicorn before its lifespan: close the site anyway
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
