"""Fault injection for the sandbox provider: rates, the run-time plan, the per-request decision.

Imports nothing outside `jobs/sandbox/`, so the provider stays importable without Celery.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .services import Service

#: Rates are floats; 0.1 + 0.2 + 0.7 sums to 1.0000000000000002, which must still be accepted.
RATE_SUM_TOLERANCE = 1e-9

#: The fields of `Faults`: those a `POST /sandbox/faults` body replaces (0 when left out).
FAULT_FIELDS = frozenset(
    {
        "fault_rate",
        "timeout_rate",
        "lost_reply_rate",
        "rate_limited_rate",
        "retry_after_seconds",
        "latency_ms",
    }
)


class Outcome(enum.StrEnum):
    """What the sandbox does with one request to a service."""

    #: Answer normally.
    OK = "ok"
    #: Answer 503 at once and apply nothing.
    ERROR = "error"
    #: Hang, then answer 504; nothing is applied.
    TIMEOUT = "timeout"
    #: Apply the effect and keep the answer under the key, then hang and answer 504.
    LOST_REPLY = "lost_reply"
    #: Answer 429 at once with `Retry-After` and apply nothing (a provider's rate limit).
    RATE_LIMITED = "rate_limited"


class Faults(BaseModel):
    """Fault rates for the sandbox, globally or for one service.

    The four rates are shares of requests, disjoint, so together they may not exceed 1.
    A rate-limited request is answered 429 with `Retry-After: retry_after_seconds`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    fault_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    timeout_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    lost_reply_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    rate_limited_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    retry_after_seconds: int = Field(default=1, ge=0, le=86_400)
    latency_ms: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _rates_fit_in_one(self) -> Faults:
        total = self.fault_rate + self.timeout_rate + self.lost_reply_rate + self.rate_limited_rate
        if total > 1.0 + RATE_SUM_TOLERANCE:
            raise ValueError(
                "fault_rate + timeout_rate + lost_reply_rate + rate_limited_rate must be <= 1, "
                f"got {total:g}"
            )
        return self


class FaultUpdate(Faults):
    """The body of `POST /sandbox/faults`.

    Fault fields not given are 0: a body replaces the targeted set, it does not patch it. A body
    naming only `honour_keys` leaves every fault set as it is, so toggling keys never wipes faults.
    """

    #: The service whose override is replaced; `None` replaces the global faults.
    service: Service | None = None
    #: Whether the sandbox deduplicates by `Idempotency-Key`; `None` leaves it unchanged.
    honour_keys: bool | None = None

    def touches_faults(self) -> bool:
        """Tell whether this update replaces a fault set (global or per service).

        Returns:
            False only when the body named `honour_keys` and nothing else.
        """
        named = self.model_fields_set
        return self.service is not None or bool(named & FAULT_FIELDS) or "honour_keys" not in named

    def faults(self) -> Faults:
        """Return the fault set this update installs."""
        return Faults.model_validate(self.model_dump(include=set(FAULT_FIELDS)))


def decide(faults: Faults, roll: float) -> Outcome:
    """Decide what happens to one request.

    The unit interval is cut into consecutive bands — error, timeout, lost reply, rate limited,
    then ok — so
    each outcome's share equals its rate, and a rate of 1 gives that outcome every time.

    Args:
        faults: The faults in force for the request's service.
        roll: A uniform random number in [0, 1).

    Returns:
        The outcome for this request.
    """
    bound = faults.fault_rate
    if roll < bound:
        return Outcome.ERROR
    bound += faults.timeout_rate
    if roll < bound:
        return Outcome.TIMEOUT
    bound += faults.lost_reply_rate
    if roll < bound:
        return Outcome.LOST_REPLY
    bound += faults.rate_limited_rate
    if roll < bound:
        return Outcome.RATE_LIMITED
    return Outcome.OK


@dataclass
class FaultPlan:
    """The faults in force: a global set plus whole-set overrides for some services.

    An override replaces the global set for its service entirely (latency included); it is not
    merged field by field, so what a service suffers is always one readable `Faults`.
    """

    global_faults: Faults = field(default_factory=Faults)
    overrides: dict[Service, Faults] = field(default_factory=dict)

    def for_service(self, service: Service) -> Faults:
        """Return the faults that apply to `service`."""
        return self.overrides.get(service, self.global_faults)

    def apply(self, update: FaultUpdate) -> None:
        """Install the fault set carried by `update` (its `honour_keys` is not ours to keep)."""
        if not update.touches_faults():
            return
        if update.service is None:
            self.global_faults = update.faults()
        else:
            self.overrides[update.service] = update.faults()

    def to_json(self) -> dict[str, object]:
        """Return the plan in the shape `GET /sandbox/faults` answers, less `honour_keys`."""
        return {
            "global": self.global_faults.model_dump(),
            "services": {
                str(service): faults.model_dump()
                for service, faults in sorted(self.overrides.items())
            },
        }
