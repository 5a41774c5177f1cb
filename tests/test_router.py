"""The path router (casedesk/router.py): exact segment matching, 404 and 405, and the
remembered matches giving the same answers as a fresh match, a route added later included."""

from __future__ import annotations

import pytest

from casedesk.anthropic.errors import ApiError
from casedesk.router import Router


async def messages(**params: str) -> None:
    """A stand-in handler."""


async def models(**params: str) -> None:
    """Another."""


def test_routes_match_whole_segments_and_decode_them_the_same_every_time() -> None:
    router = Router()
    router.add("POST", "/proxy/{deployment}/anthropic/v1/messages", messages)
    for _ in range(3):  # remembered after the first: the same match each time
        match = router.resolve("POST", "/proxy/dep%2Fa/anthropic/v1/messages")
        assert match.handler is messages and dict(match.params) == {"deployment": "dep/a"}
    other = router.resolve("POST", "/proxy/dep-b/anthropic/v1/messages")
    assert dict(other.params) == {"deployment": "dep-b"}


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/proxy/dep/anthropic/v1/messages/extra", 404),
        ("POST", "/proxy//anthropic/v1/messages", 404),
        ("GET", "/proxy/dep/anthropic/v1/messages", 405),
    ],
)
def test_refusals_are_raised_every_time(method: str, path: str, status: int) -> None:
    router = Router()
    router.add("POST", "/proxy/{deployment}/anthropic/v1/messages", messages)
    for _ in range(2):
        with pytest.raises(ApiError) as caught:
            router.resolve(method, path)
        assert caught.value.status == status


def test_a_route_added_after_a_refusal_or_a_match_is_found() -> None:
    router = Router()
    router.add("POST", "/v1/messages", messages)
    assert router.resolve("POST", "/v1/messages").handler is messages
    with pytest.raises(ApiError):
        router.resolve("GET", "/v1/models")
    router.add("GET", "/v1/models", models)
    assert router.resolve("GET", "/v1/models").handler is models
    router.add("POST", "/v1/{anything}", models)  # later routes never shadow earlier ones
    assert router.resolve("POST", "/v1/messages").handler is messages
