"""Silence syft's chatter (banners, success notices, server-side tracebacks of refused calls).

Syft prints through ``display``/``print`` and logs expected refusals as errors; our own
messages carry the useful part, so the CLI and tests run syft calls inside :func:`quiet`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterator


def silence_syft_logging() -> None:
    os.environ.setdefault("SYFT_LOG_LEVEL", "CRITICAL")
    for name in ("syft", "syft.server", "syft.server.server", "uvicorn", "httpx"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 10)
    warnings.filterwarnings("ignore", module="syft")


#: threads named so (``Datasite.start_watching``) leave the process's streams alone
WATCHER_THREAD_PREFIX = "fedsyft-watch-"
_lock = threading.Lock()
_depth = 0
_saved: tuple[object, object] | None = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow stdout/stderr written by syft inside the block.

    Reference-counted, so that blocks overlapping in several threads (sites are called
    concurrently) restore the real streams exactly once, when the last block ends.
    """
    global _depth, _saved
    if threading.current_thread().name.startswith(WATCHER_THREAD_PREFIX):
        # a site's background watcher runs across CLI invocations that swap the streams
        # themselves: it must never swap them (it reads syft's store only, which is silent)
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = (sys.stdout, sys.stderr)
            sys.stdout = sys.stderr = io.StringIO()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved is not None:
                sys.stdout, sys.stderr = _saved  # type: ignore[assignment]
                _saved = None
