"""The official `openai` Python SDK, and httpx + httpx-sse, against tokenfan-edge.

    tests/clients/run.sh                       (installs the venv, starts the edge, runs everything)
    tests/clients/.venv/bin/pytest tests/clients   (after run.sh made the venv; starts its own edge
                                                    unless TOKENFAN_EDGE_URL is set)

What the SDK expects of the wire format is the contract here (DESIGN.md 4, 4.1, 4.2): chunk
objects it can parse, `data: [DONE]`, OpenAI-style error bodies mapped to its exception classes.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from httpx_sse import connect_sse

MODEL = "tokenfan-mock"
MESSAGES = [{"role": "user", "content": "Tell me about streaming tokens."}]
FAST = {"timing": {"ttft_ms": 5, "inter_token_ms": 2}}
TIMEOUT = 20.0


@pytest.fixture(scope="module")
def client(edge_url: str) -> openai.OpenAI:
    c = openai.OpenAI(base_url=f"{edge_url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http(edge_url: str) -> httpx.Client:
    with httpx.Client(base_url=edge_url, timeout=TIMEOUT) as c:
        yield c


def stream_chat(client: openai.OpenAI, **overrides):
    """Streams one chat completion; returns (x-stream-id, list of chunks)."""
    params = dict(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        seed=7,
        max_tokens=40,
        extra_body=FAST,
    )
    params.update(overrides)
    raw = client.chat.completions.with_raw_response.create(**params)
    assert raw.http_response.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    stream_id = raw.headers.get("x-stream-id")
    assert stream_id, "x-stream-id header missing on the streaming response"
    chunks = list(raw.parse())
    return stream_id, chunks


def content_chunks(chunks):
    """The chunks after the role chunk that carry delta content."""
    return [c for c in chunks[1:] if c.choices and c.choices[0].delta.content is not None]


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content for c in content_chunks(chunks))


@pytest.fixture(scope="module")
def seven(client):
    """The streamed answer for seed 7, shared by the tests that compare against it."""
    return stream_chat(client)


# --------------------------------------------------------------------------- models


def test_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert "tokenfan-mock" in ids
    assert "tokenfan-mock-fast" in ids


# --------------------------------------------------------------------------- streaming


def test_stream_role_chunk_first(seven):
    _, chunks = seven
    first = chunks[0]
    assert first.object == "chat.completion.chunk"
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content in ("", None)
    assert first.choices[0].finish_reason is None


def test_stream_content_finish_and_usage(seven):
    stream_id, chunks = seven
    text = text_of(chunks)
    assert text, "concatenated delta contents are empty"

    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason is not None]
    assert len(finish) == 1, f"expected exactly one finish chunk, got {len(finish)}"
    assert finish[0].choices[0].finish_reason in {"stop", "length"}
    # The finish chunk comes after every content chunk and before the usage chunk.
    assert chunks.index(finish[0]) == len(chunks) - 2

    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [], "the include_usage chunk must have empty choices"
    usage = usage_chunk.usage
    assert usage is not None
    # One chunk per token event: nothing is coalesced for a client that keeps up (41 events
    # stay far below the default subscriber queue of 256).
    assert usage.completion_tokens == len(content_chunks(chunks))
    assert 1 <= usage.completion_tokens <= 40
    if finish[0].choices[0].finish_reason == "length":
        assert usage.completion_tokens == 40
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Only the last chunk carries usage (include_usage: the others have usage null).
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_chunk_ids_and_model(seven):
    stream_id, chunks = seven
    assert {c.id for c in chunks} == {f"chatcmpl-{stream_id}"}
    assert {c.model for c in chunks} == {MODEL}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.created for c in chunks}) == 1


def test_nonstream_same_text_for_same_seed(client, seven):
    _, chunks = seven
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=MESSAGES, seed=7, max_tokens=40, extra_body=FAST
    )
    stream_id = raw.headers.get("x-stream-id")
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert stream_id and completion.id == f"chatcmpl-{stream_id}"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text_of(chunks)
    assert choice.finish_reason == [c for c in chunks if c.choices][-1].choices[0].finish_reason
    assert completion.usage.completion_tokens == chunks[-1].usage.completion_tokens
    assert completion.usage.prompt_tokens == chunks[-1].usage.prompt_tokens
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_stream_is_deterministic_and_seed_matters(client, seven):
    _, chunks = seven
    _, again = stream_chat(client)
    assert text_of(again) == text_of(chunks)
    _, other = stream_chat(client, seed=8)
    assert text_of(other) != text_of(chunks), "different seeds gave the same answer"


def test_max_completion_tokens_is_honoured(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, seed=7, max_completion_tokens=5, extra_body=FAST
    )
    assert completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == "length"


def test_fast_model_streams_without_timing(client):
    _, chunks = stream_chat(client, model="tokenfan-mock-fast", max_tokens=8, extra_body=None)
    assert text_of(chunks)
    assert chunks[-1].usage.completion_tokens == len(content_chunks(chunks))


# --------------------------------------------------------------------------- errors


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    err = info.value
    assert err.status_code == 404
    assert err.code == "model_not_found"
    assert isinstance(err.body, dict) and err.body.get("message")


def test_n_greater_than_one_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, n=2)
    assert info.value.status_code == 400
    assert info.value.param == "n"


def test_tools_are_bad_request(client):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, tools=tools)
    assert info.value.status_code == 400


def test_cancel_mid_stream_raises_api_error(client, http):
    """DELETE while the SDK reads: the stream ends with `data: {"error":…}` (no [DONE]), which
    the SDK turns into openai.APIError."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        max_tokens=400,
        seed=3,
        extra_body={"timing": {"ttft_ms": 5, "inter_token_ms": 25}},
    )
    stream_id = raw.headers["x-stream-id"]
    stream = raw.parse()
    seen = 0
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen += 1
                if seen == 3:
                    r = http.delete(f"/v1/streams/{stream_id}")
                    assert r.status_code == 202, r.text
    assert not isinstance(info.value, openai.APIStatusError)
    assert "cancel" in str(info.value.message)
    assert 3 <= seen < 400
    status = http.get(f"/v1/streams/{stream_id}", params={"after": 0}).json()
    assert status["status"] == "cancelled"


# --------------------------------------------------------------------------- async client


def test_async_client_streaming(edge_url, seven):
    _, chunks = seven

    async def main():
        async with openai.AsyncOpenAI(
            base_url=f"{edge_url}/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
        ) as aclient:
            stream = await aclient.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                seed=7,
                max_tokens=40,
                extra_body=FAST,
            )
            return [chunk async for chunk in stream]

    achunks = asyncio.run(main())
    assert achunks[0].choices[0].delta.role == "assistant"
    assert text_of(achunks) == text_of(chunks)
    assert achunks[-1].usage.completion_tokens == len(content_chunks(achunks))
    assert len({c.id for c in achunks}) == 1 and achunks[0].id.startswith("chatcmpl-")


# --------------------------------------------------------------------------- httpx-sse replay/resume


def read_openai_replay(http: httpx.Client, stream_id: str, headers=None, params=None):
    """GET …/events?format=openai; returns (retry hints, [(id, chunk dict)], saw [DONE])."""
    query = {"format": "openai", **(params or {})}
    retries, events, done = [], [], False
    with connect_sse(http, "GET", f"/v1/streams/{stream_id}/events", params=query,
                     headers=headers or {}) as source:
        assert source.response.status_code == 200
        for sse in source.iter_sse():
            if sse.retry is not None:
                retries.append(sse.retry)
            if not sse.data:
                continue
            if sse.data == "[DONE]":
                done = True
                break
            events.append((sse.id, sse.json()))
    return retries, events, done


def replay_text(events) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or "" for _, e in events if e["choices"]
    )


def test_httpx_sse_openai_replay_and_resume(http, seven):
    stream_id, chunks = seven
    retries, full, done = read_openai_replay(http, stream_id)
    assert done, "replay did not end with data: [DONE]"
    assert retries and retries[0] == 1000
    assert full[0][1]["choices"][0]["delta"]["role"] == "assistant"
    assert {e["id"] for _, e in full} == {f"chatcmpl-{stream_id}"}
    full_text = replay_text(full)
    assert full_text == text_of(chunks)

    # Token chunks carry id: <seq> = 1..n; resume from one in the middle.
    token_ids = [int(i) for i, e in full if e["choices"] and e["choices"][0]["delta"].get("content")]
    assert token_ids == list(range(1, len(token_ids) + 1))
    middle = token_ids[len(token_ids) // 2]
    prefix = replay_text([(i, e) for i, e in full if i is not None and 0 < int(i) <= middle])

    _, resumed, done = read_openai_replay(http, stream_id, headers={"Last-Event-ID": str(middle)})
    assert done
    assert int(resumed[0][0]) == middle + 1, "resume did not start right after Last-Event-ID"
    assert not resumed[0][1]["choices"][0]["delta"].get("role"), "role chunk repeated on resume"
    assert prefix + replay_text(resumed) == full_text

    # Last-Event-ID wins over ?after=.
    _, resumed2, _ = read_openai_replay(
        http, stream_id, headers={"Last-Event-ID": str(middle)}, params={"after": "1"}
    )
    assert [i for i, _ in resumed2] == [i for i, _ in resumed]


def test_httpx_sse_at_the_end_is_204(http, seven):
    stream_id, _ = seven
    status = http.get(f"/v1/streams/{stream_id}", params={"after": 0}).json()
    terminal = status["events"][-1]["seq"]
    assert status["events"][-1]["type"] == "done"
    r = http.get(f"/v1/streams/{stream_id}/events", params={"format": "openai"},
                 headers={"Last-Event-ID": str(terminal)})
    assert r.status_code == 204


def test_httpx_sse_native_events_match_short_poll(http):
    r = http.post("/v1/streams", json={"prompt": "hello", "max_tokens": 20, "seed": 11, **FAST})
    assert r.status_code == 201, r.text
    stream_id = r.json()["id"]
    events = []
    with connect_sse(http, "GET", r.json()["urls"]["events"]) as source:
        for sse in source.iter_sse():
            if not sse.data:
                continue
            event = sse.json()
            assert sse.event == event["type"] and sse.id == str(event["seq"])
            events.append(event)
            if event["type"] in ("done", "error"):
                break
    polled = http.get(f"/v1/streams/{stream_id}", params={"after": 0}).json()
    assert polled["status"] == "done"
    assert events == polled["events"]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
