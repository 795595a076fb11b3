"""Limits as the ledger holds them: the rules a claim takes a token or a slot under, their
keys as parsed templates. Must not import celery, kombu, jobs or config."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from ledger.types import JSON, LimitKind


class KeySource(enum.StrEnum):
    """Where a part of a limit's key comes from."""

    #: Written as is.
    TEXT = "text"
    #: A field of the job's context.
    CONTEXT = "context"
    #: A field of a map item (an object).
    ITEM = "item"


#: A limit's key template, parsed: (source, text or field name) parts, in order.
KeyTemplate: TypeAlias = tuple[tuple[KeySource, str], ...]


@dataclass(frozen=True)
class RateRule:
    """A rate limit: tokens spaced `interval` seconds apart (GCRA: one row per key holding
    its theoretical arrival time), `burst` at once after a quiet spell; a claim may take a
    token up to `hold` seconds ahead and wait for it before acting."""

    template: str
    key: KeyTemplate
    interval: float
    burst: int
    hold: float

    @property
    def tolerance(self) -> float:
        """How far ahead of now the arrival time may be for a token to be free now."""
        return (self.burst - 1) * self.interval


@dataclass(frozen=True)
class SlotRule:
    """A concurrency limit: `limit` slots per key, each a row leased to a claim's owner."""

    template: str
    key: KeyTemplate
    limit: int


#: Parameter names of the parts of each limit's key, by limit.
_PREFIX = {LimitKind.RATE: "rate", LimitKind.CONCURRENCY: "slot"}


@dataclass(frozen=True)
class LimitRules:
    """The limits a step's claim takes, at most one of each kind."""

    rate: RateRule | None = None
    slots: SlotRule | None = None

    @property
    def shape(self) -> tuple[tuple[KeySource, ...] | None, tuple[KeySource, ...] | None]:
        """What the claim statement's form depends on (its parameters carry the rest)."""
        rate = tuple(source for source, _ in self.rate.key) if self.rate else None
        slots = tuple(source for source, _ in self.slots.key) if self.slots else None
        return rate, slots

    def params(self) -> dict[str, Any]:
        """The claim statement's parameters for these limits."""
        values: dict[str, Any] = {}
        if self.rate is not None:
            rate = self.rate
            values |= key_params(LimitKind.RATE, rate.key)
            values |= {
                "p_rate_interval": rate.interval,
                "p_rate_ahead": rate.tolerance + rate.hold,
                "p_rate_span": rate.interval + rate.tolerance,
            }
        if self.slots is not None:
            values |= key_params(LimitKind.CONCURRENCY, self.slots.key)
            values["p_slot_limit"] = self.slots.limit
        return values

    def render(self, context: Mapping[str, JSON], item: JSON = None) -> tuple[str | None, ...]:
        """The (rate, concurrency) keys for a job's context (and an item), as the claim
        statement renders them on Postgres."""
        return (
            render_key(self.rate.key, context, item) if self.rate else None,
            render_key(self.slots.key, context, item) if self.slots else None,
        )


def key_params(kind: LimitKind, key: KeyTemplate) -> dict[str, str]:
    """The parameters naming each part of a limit's key (`p_rate_part0`, …)."""
    return {f"p_{_PREFIX[kind]}_part{index}": text for index, (_, text) in enumerate(key)}


def render_key(key: KeyTemplate, context: Mapping[str, JSON], item: JSON) -> str:
    """A limit's key for a job's context and an item: a field's text is its string, or its
    JSON for another value; a missing or null field is empty."""
    fields = item if isinstance(item, dict) else {}
    out: list[str] = []
    for source, text in key:
        if source is KeySource.TEXT:
            out.append(text)
            continue
        value = (context if source is KeySource.CONTEXT else fields).get(text)
        out.append("" if value is None else value if isinstance(value, str) else json.dumps(value))
    return "".join(out)
