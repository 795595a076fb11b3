"""`jobs.provider`: reading `Retry-After`, and turning provider answers into results,
`TransientError` (try again) or `PermanentError` (dead letter). Real `httpx.Response`s, no
transport: nothing is sent anywhere."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from jobs.errors import PermanentError, TransientError
from jobs.provider import _answer, retry_after_seconds

#: 2015-10-21 07:28:00 UTC.
NOW = 1_445_412_480.0

# --- retry_after_seconds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:29:30 GMT", 90.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Wed, 21 Oct 2015 07:00:00 GMT", 0.0),  # a date in the past: now
    ],
)
def test_retry_after_in_seconds_or_as_a_date(header: str, seconds: float) -> None:
    assert retry_after_seconds(header, now=NOW) == seconds


@pytest.mark.parametrize(
    "header", [None, "", "   ", "soon", "1.5", "-5", "12s", "Wed, 99 Foo 2015 07:28:00 GMT"]
)
def test_missing_or_unreadable_retry_after_is_none(header: str | None) -> None:
    assert retry_after_seconds(header, now=NOW) is None


def test_a_date_is_measured_from_the_real_clock_by_default() -> None:
    in_an_hour = email.utils.formatdate(timeval=time.time() + 3_600, usegmt=True)

    delay = retry_after_seconds(in_an_hour)

    assert delay is not None
    assert 3_590.0 <= delay <= 3_600.0


@hypothesis_settings(max_examples=300, deadline=None)
@given(header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40))
def test_any_ascii_header_gives_none_or_a_non_negative_delay(header: str) -> None:
    delay = retry_after_seconds(header, now=NOW)

    assert delay is None or delay >= 0.0


def test_a_superscript_digit_is_unreadable_not_a_crash() -> None:
    assert retry_after_seconds("²", now=NOW) is None


# --- _answer --------------------------------------------------------------------------------

REQUEST = httpx.Request("POST", "http://provider.test/payments/charges")


def _response(
    status: int,
    *,
    json: object = None,
    content: bytes | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> httpx.Response:
    if content is not None:
        return httpx.Response(status, content=content, headers=headers, request=REQUEST)
    return httpx.Response(status, json=json, headers=headers, request=REQUEST)


@pytest.mark.parametrize("status", [200, 201])
def test_a_2xx_object_is_the_result(status: int) -> None:
    body = {"id": "ch_1", "amount": 700, "currency": "EUR"}

    assert _answer("POST", "/payments/charges", _response(status, json=body)) == body


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429, 409, 408, 425])
@pytest.mark.parametrize("applies", [True, False])
def test_overload_and_conflict_are_transient(status: int, applies: bool) -> None:
    """A provider that ignores keys may have committed, then answered any of these: after a
    request that may apply an effect, none of them says "nothing applied". A read applied
    nothing, whatever it answered."""
    response = _response(
        status,
        json={"error": {"type": "injected_fault"}},
        headers=[(b"Retry-After", b"3")],
    )

    with pytest.raises(TransientError) as caught:
        _answer("POST", "/payments/charges", response, applies=applies)

    assert str(caught.value) == f"POST /payments/charges answered {status} (injected_fault)"
    assert caught.value.retry_after == 3.0
    assert (caught.value.maybe_applied, caught.value.status) == (applies, status)


def test_a_transient_answer_without_retry_after_or_body() -> None:
    with pytest.raises(TransientError) as caught:
        _answer("GET", "/prices/SKU-1", _response(503, content=b"upstream down"))

    assert str(caught.value) == "GET /prices/SKU-1 answered 503"
    assert caught.value.retry_after is None


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(402, "card_declined"), (400, "bad_request"), (404, "not_found"), (422, "validation_error")],
)
def test_client_errors_are_permanent_and_name_the_error_type(status: int, error_type: str) -> None:
    response = _response(status, json={"error": {"type": error_type, "message": "no"}})

    with pytest.raises(PermanentError) as caught:
        _answer("POST", "/payments/charges", response)

    assert str(caught.value) == f"POST /payments/charges answered {status} ({error_type})"
    assert not isinstance(caught.value, TransientError)
    # A definite refusal: nothing was applied, so even an at-most-once step may try again.
    assert (caught.value.maybe_applied, caught.value.status) == (False, status)


@pytest.mark.parametrize(
    "body",
    [{"detail": "Not Found"}, {"error": "declined"}, ["error"], "declined", None],
    ids=["no-error-key", "error-not-an-object", "list", "string", "empty"],
)
def test_a_client_error_without_an_error_type(body: object) -> None:
    with pytest.raises(PermanentError) as caught:
        _answer("GET", "/customers/c-1", _response(404, json=body))

    assert str(caught.value) == "GET /customers/c-1 answered 404"


def test_a_200_that_is_not_json_is_transient() -> None:
    with pytest.raises(TransientError) as caught:
        _answer("POST", "/payments/charges", _response(200, content=b"<html>ok</html>"))

    assert str(caught.value) == "POST /payments/charges answered 200 with a body that is not JSON"
    assert isinstance(caught.value.__cause__, ValueError)


def test_a_200_that_is_not_json_may_have_been_applied() -> None:
    with pytest.raises(TransientError) as caught:
        _answer("POST", "/payments/charges", _response(200, content=b"<html>ok</html>"))

    assert caught.value.maybe_applied is True


@pytest.mark.parametrize("body", [b'[{"id": "ch_1"}]', b'"ch_1"', b"7", b"null"])
def test_a_200_that_is_not_an_object_is_permanent(body: bytes) -> None:
    with pytest.raises(PermanentError) as caught:
        _answer("POST", "/payments/charges", _response(200, content=body))

    assert str(caught.value) == (
        "POST /payments/charges answered 200 with a body that is not an object"
    )
    # The provider acted; only its answer is unusable.
    assert caught.value.maybe_applied is True


def test_a_garbled_retry_after_still_gives_a_transient_error() -> None:
    response = _response(503, content=b"", headers=[(b"Retry-After", b"\xb2")])

    with pytest.raises(TransientError) as caught:
        _answer("POST", "/payments/charges", response)

    assert caught.value.retry_after is None
