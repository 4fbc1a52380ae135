"""The round messages a site accepts, validated before anything else happens.

Everything in a message comes from the data scientist's side, so it carries no weights and
no scaling: only the round number and the *evidence* of the previous aggregate (and of any
the site missed), from which the site derives the model itself
(:mod:`fed_tasks.site_state`). Unknown fields, wrong types, oversized lists and out-of-range
rounds are refused here with one line naming the field, before the site touches a private
value.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fed_tasks.codec import PayloadError
from fed_tasks.schedule import SUMMED_ACTIONS

Kind = Literal["plain", "paillier", "secagg"]
MAX_SITES = 1000  # more contributions than this in one aggregate is garbage, not a federation
MAX_TEXT = 64 * 1024 * 1024  # one relayed string (a masked vector of ~8M values)
MAX_CATCH_UP = 1000  # missed aggregates relayed in one call (a job has at most 1000 rounds)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AggregateEvidence(_Strict):
    """What lets a site check one released aggregate itself, per aggregation mode.

    - ``plain``: every contributor's signed vector (the site adds them itself);
    - ``paillier``: the decrypted sum and the key authority's signature over it;
    - ``secagg``: the survivors' signed masked inputs and, if sites dropped, the revealed
      shares of their round keys (the site forms and opens the sum itself).
    """

    kind: Kind
    action: Literal[SUMMED_ACTIONS]  # type: ignore[valid-type]
    round: int = Field(ge=0, le=100_000)  # the pass: 0 the statistics; r training round r
    contributions: list[str] = Field(default=[], max_length=MAX_SITES)
    sum: str | None = Field(default=None, max_length=MAX_TEXT)
    attestation: str | None = Field(default=None, max_length=16_384)
    inputs: list[str] = Field(default=[], max_length=MAX_SITES)
    recovery: list[str] = Field(default=[], max_length=MAX_SITES)
    # the contributors' signed audit heads: each site keeps the others' as receipts
    heads: list[dict[str, Any]] = Field(default=[], max_length=MAX_SITES)


class StatsMessage(_Strict):
    inbox: str | None = Field(default=None, max_length=MAX_TEXT)  # secure sum: key shares
    roster: list[str] | None = Field(default=None, max_length=MAX_SITES)  # as in FitMessage


class FitMessage(_Strict):
    """A summed call after the statistics: training round r, or pass r of another phase.

    ``catch_up``: the aggregates released while this site was not called (not selected,
    or too slow), oldest first; the site checks and applies each before ``previous``."""

    round: int = Field(ge=1, le=100_000)
    previous: AggregateEvidence
    catch_up: list[AggregateEvidence] = Field(default=[], max_length=MAX_CATCH_UP)
    inbox: str | None = Field(default=None, max_length=MAX_TEXT)
    # a buffered secure-sum round: the sites called, whom this site masks with
    roster: list[str] | None = Field(default=None, max_length=MAX_SITES)


class EvaluateMessage(_Strict):
    previous: AggregateEvidence | None = None  # the last aggregate, if the site lacks it
    catch_up: list[AggregateEvidence] = Field(default=[], max_length=MAX_CATCH_UP)


class RevealMessage(_Strict):
    previous: AggregateEvidence


_SCHEMAS: dict[str, type[_Strict]] = {
    "stats": StatsMessage, **{a: FitMessage for a in SUMMED_ACTIONS if a != "stats"},
    "evaluate": EvaluateMessage, "validate": EvaluateMessage,
    "secagg_reveal": RevealMessage}


def parse_message(action: str, message: dict[str, Any]) -> _Strict:
    """The validated message of ``action``; :class:`PayloadError` (one line) otherwise."""
    schema = _SCHEMAS.get(action)
    if schema is None:
        raise PayloadError(f"no round message is defined for action {action!r}")
    try:
        return schema.model_validate(message)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "message"
        raise PayloadError(f"{action} message field {where!r}: {err.get('msg')}") from None
