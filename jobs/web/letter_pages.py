"""The dead-letter pages: the letters of a state, one letter, the plan of its replay, and the
replay and resolve forms (each behind the session's CSRF token)."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Form
from fastapi.responses import HTMLResponse

from jobs.ops.dead_letters import DeadLetterDesk, ReplayResult, letter_view
from jobs.web.http import Intake, IntakeDep
from jobs.web.rendering import MAX_ROWS, PageRoute, render
from jobs.web.sessions import CsrfDep, PageError, Session, SessionDep
from ledger import JSON, DeadLetter, DeadLetterNotFound, DeadLetterReason, DeadLetterState

#: Mounted by `jobs.web.pages`.
router = APIRouter(route_class=PageRoute)


def _letter(intake: Intake, letter_id: str) -> DeadLetter:
    try:
        return intake.letters.get(int(letter_id))
    except (ValueError, DeadLetterNotFound):
        raise PageError(404, f"there is no dead letter {letter_id}") from None


def _desk(intake: Intake) -> DeadLetterDesk:
    return DeadLetterDesk(
        store=intake.runtime.store, letters=intake.letters, dispatch=intake.dispatch
    )


def _who(name: str) -> str:
    name = " ".join(name.split())[:64]
    return f"ui:{name}" if name else "ui"


@router.get("/ui/dead-letters")
def dead_letters_page(session: SessionDep, intake: IntakeDep, state: str = "open") -> HTMLResponse:
    """Dead letters of one state (open by default) or all, oldest failure first."""
    if state not in {*DeadLetterState, "all"}:
        raise PageError(400, f"there is no dead letter state {state!r}")
    wanted = None if state == "all" else DeadLetterState(state)
    letters = intake.letters.list(state=wanted, limit=MAX_ROWS)
    return render("dead_letters.html", session, "Dead letters", letters=letters, state=state)


@router.get("/ui/dead-letters/{letter_id}")
def dead_letter_page(letter_id: str, session: SessionDep, intake: IntakeDep) -> HTMLResponse:
    """One dead letter: its error, traceback, input and attempts, and what can be done."""
    letter = _letter(intake, letter_id)
    is_open = letter.state is DeadLetterState.OPEN
    desk = _desk(intake)
    unknown = letter.reason is DeadLetterReason.OUTCOME_UNKNOWN or desk.outcome_unknown(letter)
    title, view = f"Dead letter {letter.id}", letter_view(letter)
    return render("dead_letter.html", session, title, letter=view, is_open=is_open, unknown=unknown)


@router.get("/ui/dead-letters/{letter_id}/plan")
def plan_page(
    letter_id: str, session: SessionDep, intake: IntakeDep, force: bool = False
) -> HTMLResponse:
    """What a replay would do (changes nothing); the replay button is only here."""
    letter = _letter(intake, letter_id)
    plan = _desk(intake).plan(letter, force=force)
    title = f"Replay plan: dead letter {letter.id}"
    return render("plan.html", session, title, plan=plan, force=force)


@router.post("/ui/dead-letters/{letter_id}/replay")
def replay(
    letter_id: str,
    session: CsrfDep,
    intake: IntakeDep,
    force: Annotated[bool, Form()] = False,
    by: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Replay a dead letter: its job resumes at the failed step, on the retry queue."""
    letter = _letter(intake, letter_id)
    result = _desk(intake).replay(letter, by=_who(by), force=force)
    return _outcome(session, "Replay", result)


@router.post("/ui/dead-letters/{letter_id}/resolve")
def resolve(
    letter_id: str,
    session: CsrfDep,
    intake: IntakeDep,
    decision: Annotated[str, Form(alias="as")] = "",
    result: Annotated[str, Form()] = "",
    by: Annotated[str, Form()] = "",
) -> HTMLResponse:
    """Record a person's decision about a step whose outcome is unknown: it took effect
    (`as=succeeded`, with an optional JSON result) or it did not (`as=retry`)."""
    letter = _letter(intake, letter_id)
    person = _who(by)
    if decision == "retry":
        if result.strip():
            raise PageError(422, "a result goes with “it took effect”, not with “run it again”")
        return _outcome(session, "Resolve", _desk(intake).retry(letter, by=person))
    if decision != "succeeded":
        raise PageError(422, "choose whether the step took effect (succeeded) or not (retry)")
    outcome: JSON = {"resolved_by": person}
    if result.strip():
        try:
            outcome = json.loads(result)
        except json.JSONDecodeError as exc:
            raise PageError(422, f"the result is not JSON ({exc.msg})") from None
        except RecursionError:
            raise PageError(422, "the result is not JSON we can read (nested too deep)") from None
    return _outcome(session, "Resolve", _desk(intake).resolve(letter, by=person, result=outcome))


def _outcome(session: Session, action: str, result: ReplayResult) -> HTMLResponse:
    title, status = f"{action}: dead letter {result.letter_id}", 200 if result.done else 409
    return render("outcome.html", session, title, status, result=result)
