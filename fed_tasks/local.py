"""Sites as plain in-memory tables: the centralized and local-only references, and the
syft-free baseline that measures what the datasites cost."""

from __future__ import annotations

from typing import Any

import pandas as pd

from fed_tasks import site_step
from fed_tasks.interface import SiteConnection
from fed_tasks.spec import JobSpec


class LocalSite(SiteConnection):
    """:class:`SiteConnection` that runs the site step directly on frames it holds."""

    def __init__(self, name: str, spec: JobSpec, train: pd.DataFrame, test: pd.DataFrame) -> None:
        self.name = name
        self.spec = spec
        self.train = train
        self.test = test

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        return site_step.plain_reply(
            site_step.run(self.spec, action, message, self.train, self.test))
