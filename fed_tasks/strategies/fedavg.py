"""Federated averaging (McMahan et al. 2017): rows weigh, in every aggregation mode."""

from __future__ import annotations

from fed_tasks.strategies.base import Strategy


class FedAvg(Strategy):
    """The sum of ``[n·Δ, n·loss, n]``: each site counts by its rows."""

    name = "fedavg"
