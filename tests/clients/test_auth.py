"""The official `openai` SDK and httpx-sse against an edge with `--auth api-keys`.

An edge of its own (started here, whatever TOKENFAN_EDGE_URL says) with two tenants, at most
one running stream per tenant, and stream tickets: the SDK's `api_key` is the bearer key,
refusals map to the SDK's exception classes, and a ticket lets a plain SSE client read one
stream.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from conftest import start_edge

ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"
MODEL = "tokenfan-mock"
MESSAGES = [{"role": "user", "content": "Tell me about streaming tokens."}]
FAST = {"timing": {"ttft_ms": 5, "inter_token_ms": 2}}
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def auth_edge() -> str:
    child, url = start_edge(
        "--auth",
        "api-keys",
        "--tenant-max-concurrent-streams",
        "1",
        env={
            "TOKENFAN_EDGE_API_KEYS": f"{ALICE}:alice,{BOB}:bob",
            "TOKENFAN_EDGE_TICKET_SECRET": "client-tests-ticket-secret-0123456789",
        },
    )
    try:
        yield url
    finally:
        child.kill()
        child.wait(10)


def sdk(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def test_the_api_key_is_the_bearer_credential(auth_edge):
    with sdk(auth_edge, ALICE) as client:
        assert "tokenfan-mock" in [m.id for m in client.models.list()]
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=20, seed=3, extra_body=FAST
        )
        assert raw.headers["x-stream-ticket"].startswith("tft1.")
        chunks = list(raw.parse())
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}


def test_a_wrong_key_raises_authentication_error(auth_edge):
    with sdk(auth_edge, "sk-wrong-0123456789abcdef") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert caught.value.status_code == 401
    # As the real API: code invalid_api_key; the edge's own tag is in the message.
    assert caught.value.code == "invalid_api_key"
    assert "invalid_credentials" in caught.value.message
    with sdk(auth_edge, "sk-wrong-0123456789abcdef") as client:
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_a_second_running_stream_raises_rate_limit_error_until_the_first_ends(auth_edge):
    with sdk(auth_edge, ALICE) as alice, sdk(auth_edge, BOB) as bob:
        slow = {"timing": {"ttft_ms": 5, "inter_token_ms": 20}}
        first = alice.chat.completions.create(
            model=MODEL, messages=MESSAGES, stream=True, max_tokens=100, extra_body=slow
        )
        with pytest.raises(openai.RateLimitError) as caught:
            alice.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        assert caught.value.code == "rate_limit_exceeded"
        assert "concurrency_limited" in caught.value.message
        assert caught.value.response.headers["retry-after"] == "1"
        # Another tenant is not held back.
        done = bob.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=FAST
        )
        assert done.choices[0].finish_reason == "length"
        assert sum(1 for _ in first) > 100  # role chunk, 100 tokens, finish chunk
        # The slot is freed as the stream ends (asynchronously: allow a moment).
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                alice.chat.completions.create(
                    model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=FAST
                )
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slot is never freed"
                time.sleep(0.05)


def test_a_ticket_lets_a_plain_sse_client_read_one_stream(auth_edge):
    with httpx.Client(base_url=auth_edge, timeout=TIMEOUT) as http:
        created = http.post(
            "/v1/streams",
            headers={"authorization": f"Bearer {ALICE}"},
            json={"prompt": "hi", "max_tokens": 8, "seed": 1, **FAST},
        )
        assert created.status_code == 201
        stream_id, ticket = created.json()["id"], created.json()["ticket"]
        with connect_sse(http, "GET", f"/v1/streams/{stream_id}/events?ticket={ticket}") as sse:
            events = [e.json() for e in sse.iter_sse() if e.id]
        assert [e["seq"] for e in events] == list(range(1, 10))
        assert events[-1]["type"] == "done"
        # The same ticket opens nothing else, and no ticket opens nothing.
        other = http.get(f"/v1/streams/{stream_id}?ticket={ticket[:-1]}x")
        assert other.status_code == 401 and other.json()["error"]["code"] == "invalid_ticket"
        assert http.get(f"/v1/streams/{stream_id}").status_code == 401
