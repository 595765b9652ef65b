"""The edge's checks of a request before any server (gateway/edge.lua's second role, and Envoy's
own refusals in envoy.yaml), through the real Envoy with every service down: what is refused
here never needs a server."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.proxy import (
    SERVER_METADATA_HARD_LIMIT,
    SERVER_METADATA_LIMIT,
)
from servers.common.server import SERVER_OPTIONS
from tests.gateway.test_envoy import start_edge
from tests.helpers import ENVELOPE_KEYS, ENVELOPE_TIME, assert_envelope

NOT_JSON = "the request body is not valid JSON (RFC 8259)"


@pytest.fixture
async def edge(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """Envoy alone (its upstreams refuse connections), without the flood guard in the way;
    yields its URL and its log file."""
    log = tmp_path / "envoy.log"
    cfg, proc = await start_edge(tmp_path, log, rate_per_connection=100_000)
    try:
        yield f"http://127.0.0.1:{cfg.public_port}", log
    finally:
        await proc.stop()


def _strict_json(text: str) -> bool:
    """Python's parser as the oracle of RFC 8259 (less its NaN and Infinity)."""

    def refuse(word: str) -> object:
        raise ValueError(word)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    return True


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.choice(["str", "num", "lit"] + (["obj", "arr"] if depth < 4 else []))
    if kind == "str":
        return "".join(rng.choice('ab"\\/{}[],: \n\té\u2028\x7f') for _ in range(rng.randint(0, 5)))
    if kind == "num":
        return rng.choice([0, -1, 2.5e-9, 10**20, -0.0, 1.5])
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "arr":
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}": _value(rng, depth + 1) for i in range(rng.randint(0, 3))}


# What a mutation puts in: JSON's punctuation, and what lenient parsers take for it.
_INSERTS = list("{}[],:\"\\ \t\n\r\x0b\x00'-+.0123456789eEtfnulsaxé/") + [
    "true",
    "null",
    "NaN",
    "Infinity",
    "//",
    "/*",
    "\\u12",
    "\\u00e9",
    "\ufeff",
    "0x1",
]


def _mutated(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 2)):
        at = rng.randint(0, len(text))
        action = rng.choice(["insert", "delete", "replace"])
        if action == "insert":
            text = text[:at] + rng.choice(_INSERTS) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at] + rng.choice(_INSERTS) + text[at + 1 :]
    return text


async def test_a_body_must_be_strict_json(edge: tuple[str, Path]) -> None:
    """protobuf's JSON parser is lenient (single quotes, bare keys, trailing commas, NaN), so
    the edge refuses any body that is not RFC 8259 JSON, and takes every one that is, with
    Python's parser as the judge. The agent config route binds one field as its body: only
    its syntax is checked there, so any JSON value passes the edge (to be judged after it)."""
    url, _ = edge
    rng = random.Random(20261124)
    paths = ["/api/v1/agents/a1/config", "/api/v1/agents/a1/config/"]
    disagreements = []
    async with httpx.AsyncClient(base_url=url) as client:
        for round_ in range(400):
            doc = {"configuration": _value(rng)} if round_ % 2 else _value(rng)
            spaces = rng.choice(["", " ", "\n\t\r "])
            text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1]))
            text = spaces + text + spaces
            if round_ % 3:
                text = _mutated(rng, text)
            if not text:
                continue
            reply = await client.patch(
                rng.choice(paths),
                content=text.encode(),
                headers={"content-type": "application/json"},
            )
            refused = reply.status_code == 400 and NOT_JSON in reply.json()["error"]["message"]
            if refused == _strict_json(text):
                disagreements.append((text, reply.status_code, reply.text))
    assert disagreements == []


@pytest.mark.parametrize(
    "body",
    [
        "{'type':'echo','description':'x','prority':3}",
        '{prority:3,description:"x",type:"echo"}',
        '{"type":"echo","description":"x",}',
        '{"type":"echo","description":"x","metadata":{"a":[1,]}}',
        '{"type":"echo","description":"x","metadata":{"n":NaN}}',
        '{"type":"echo","description":"x"} {}',
        '{"type":"echo","description":"x"//',
        '{"type":"echo","description":"x\ty"}',
        '{"type":"echo","description":"\\x41"}',
        '{"type":"echo","priority":012}',
        '{"type":"echo","priority":+1}',
        '{"type":"echo","priority":1.}',
        "\ufeff{}",
        " ",
    ],
)
async def test_lenient_json_is_refused_on_every_checked_route(
    edge: tuple[str, Path], body: str
) -> None:
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        for path in ("/api/v1/tasks", "/api/tasks/", "/api/v1/tasks/t1/stop"):
            reply = await client.post(path, content=body.encode())
            error = assert_envelope(reply, 400, "VALIDATION_ERROR")
            assert str(error["message"]).startswith(NOT_JSON), error


async def test_a_trailing_slash_is_checked_like_the_path_without(edge: tuple[str, Path]) -> None:
    """The transcoder routes /api/v1/tasks/ as /api/v1/tasks, so the edge checks it alike."""
    url, _ = edge
    cases = [
        ("/api/v1/tasks/", {"type": "nosuch", "description": "x", "prority": 3}),
        ("/api/v1/tasks/", {"description": "x", "required_capabilities": "echo"}),
        ("/api/v1/tasks/t1/stop/", {"reasn": "typo"}),
        ("/api/v1/auth/login/", {"username": "a", "password": "b", "remember": True}),
    ]
    async with httpx.AsyncClient(base_url=url) as client:
        for path, body in cases:
            assert_envelope(await client.post(path, json=body), 400, "VALIDATION_ERROR")
        # A good body there goes on (to the token check: no server is needed to refuse it).
        good = await client.post("/api/v1/tasks/", json={"type": "echo", "description": "x"})
        assert_envelope(good, 401, "AUTH_REQUIRED")


async def _passes(client: httpx.AsyncClient, method: str, path: str, **kwargs: object) -> None:
    """The request got past the edge's checks: to the token check, which needs no server."""
    reply = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    assert_envelope(reply, 401, "AUTH_REQUIRED")


async def _refused(
    client: httpx.AsyncClient, method: str, path: str, message: str, **kwargs: object
) -> None:
    reply = await client.request(method, path, **kwargs)  # type: ignore[arg-type]
    error = assert_envelope(reply, 400, "VALIDATION_ERROR")
    assert message in str(error["message"]), (method, path, error)


async def test_a_query_parameter_cannot_override_the_path(edge: tuple[str, Path]) -> None:
    """The transcoder sets a path-bound field from a query parameter of its name: `DELETE
    /api/v1/tasks/A?task_id=B` would cancel B while Envoy's log (and the agent routing header)
    said A. In either spelling, escaped, or as a dotted path; the one field a PATCH binds as
    its body too. A route whose body is "*" takes no query parameter at all."""
    url, _ = edge
    overrides = "names a field the path sets"
    async with httpx.AsyncClient(base_url=url) as client:
        for method, path in [
            ("DELETE", "/api/v1/tasks/A?task_id=B"),
            ("DELETE", "/api/tasks/A/?taskId=B"),
            ("GET", "/api/v1/tasks/A/result?task%5Fid=B"),
            ("GET", "/api/v1/tasks/A?task_id.x=B"),
            ("GET", "/api/v1/agents/a1/messages?limit=5&agent_id=a2"),
            ("PATCH", "/api/v1/agents/a1/config?configuration.k=1"),
        ]:
            await _refused(client, method, path, overrides, json={} if method == "PATCH" else None)
        await _refused(
            client,
            "POST",
            "/api/v1/tasks?priority=10",
            "this call takes no query parameters",
            json={"description": "x"},
        )
        await _refused(
            client,
            "POST",
            "/api/v1/agents/a1/tasks/t1/complete?agent_id=a2",
            "this call takes no query parameters",
            json={},
        )
        # The query parameters a route does take still pass.
        await _passes(client, "GET", "/api/v1/tasks?status=queued&limit=2&offset=0")
        await _passes(client, "PATCH", "/api/v1/agents/a1/config?update_mask=k", json={"k": 1})
        await _passes(client, "GET", "/api/v1/tasks/A")


async def test_a_query_parameter_says_a_value_once(edge: tuple[str, Path]) -> None:
    """`?limit=1&limit=2` listed 2 (the transcoder takes the last), `?subject_id=x&subjectId=y`
    filtered on y: a client's tools may read the first. A list field still takes several."""
    url, _ = edge
    twice = "is given twice"
    async with httpx.AsyncClient(base_url=url) as client:
        for path in [
            "/api/v1/events?limit=1&limit=2",
            "/api/v1/events?subject_id=x&subjectId=y",
            "/api/v1/events?after=1-0&after=2-0",
            "/api/v1/tasks?status=queued&st%61tus=failed",
        ]:
            await _refused(client, "GET", path, twice)
        await _passes(client, "GET", "/api/v1/events?patterns=task.*&patterns=agent.*&limit=2")
        await _passes(client, "GET", "/api/v1/agents?capabilities=a&capabilities=b")


async def test_a_route_without_a_body_refuses_one(edge: tuple[str, Path]) -> None:
    """The transcoder reads a GET's or a DELETE's body into the request, past every check of a
    body (`{limit:2}` listed two tasks): such a body is refused."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        await _refused(
            client, "GET", "/api/v1/tasks", "takes no request body", content=b'{"limit":2}'
        )
        await _refused(
            client, "DELETE", "/api/v1/tasks/t1", "takes no request body", content=b"{bogus:1,}"
        )
        await _passes(client, "GET", "/api/v1/tasks")
        await _passes(client, "DELETE", "/api/v1/tasks/t1")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('{"description":"x","description":"y"}', 'the key "description" comes twice'),
        ('{"description":"x","metadata":{"a":1,"a":2}}', 'the key "a" comes twice'),
        (
            '{"description":"x","max_attempts":1,"maxAttempts":5}',
            'the field "max_attempts" comes twice in the request body',
        ),
        ('{"description":"x","required_capabilities":[["a"]]}', "not of arrays or nulls"),
        ('{"description":"x","requiredCapabilities":["a",null]}', "not of arrays or nulls"),
    ],
)
async def test_a_body_says_each_thing_once_and_lists_hold_values(
    edge: tuple[str, Path], body: str, message: str
) -> None:
    """protobuf's parser takes the last of two strings, merges two objects, joins two lists,
    flattens a list in a list and drops a null from one; a client's JSON library reads the
    same body otherwise. The edge refuses them all."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        await _refused(client, "POST", "/api/v1/tasks", message, content=body.encode())


async def test_bodies_with_distinct_keys_and_plain_lists_pass(edge: tuple[str, Path]) -> None:
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        for body in [
            '{"description":"x","metadata":{"a":{"k":1},"b":{"k":[[1],null]}}}',
            '{"description":"x","required_capabilities":[]}',
            '{"description":"x","required_capabilities":null}',
            '{"description":"x","required_capabilities":["a","b"],"priority":3}',
            # After the list, nulls and lists elsewhere are free-form again.
            '{"required_capabilities":["a"],"metadata":{"k":null,"l":[[1]]},"description":"x"}',
        ]:
            await _passes(client, "POST", "/api/v1/tasks", content=body.encode())


@pytest.mark.parametrize(
    "ctype",
    [
        "application/grpc-web+json",
        "application/grpc-web",
        "application/grpcx",
        "application/grpc-json",
        "application/grpc;charset=utf-8",
        "Application/GRPC",
    ],
)
async def test_a_content_type_envoy_transcodes_is_checked_as_rest(
    edge: tuple[str, Path], ctype: str
) -> None:
    """Envoy takes a request for gRPC only with application/grpc or application/grpc+...; it
    transcodes the rest as REST, so the edge checks them as REST."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        reply = await client.post(
            "/api/v1/tasks",
            content=b'{"type":"echo","description":"x","prority":3}',
            headers={"content-type": ctype},
        )
    error = assert_envelope(reply, 400, "VALIDATION_ERROR")
    assert error["message"] == 'unknown field "prority" in the request body'


async def test_grpc_content_types_pass_through(edge: tuple[str, Path]) -> None:
    """application/grpc and application/grpc+proto are gRPC: not transcoded nor read as JSON,
    and answered with a gRPC status (here the token check's UNAUTHENTICATED)."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        for ctype in ("application/grpc", "application/grpc+proto"):
            reply = await client.post(
                "/api/v1/tasks", content=b"{'not json", headers={"content-type": ctype}
            )
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"] == "application/grpc", reply.headers
            assert reply.headers["grpc-status"] == "16", reply.headers


def _raw(url: str, request: bytes, wait: float = 5.0) -> bytes:
    """Sends bytes as they are on a new connection; returns all that comes back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(request)
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def _envelope_of(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == ENVELOPE_KEYS, error
    assert ENVELOPE_TIME.fullmatch(str(error["timestamp"])), error
    assert isinstance(error["message"], str) and error["message"], error
    return status, error


async def test_refusals_of_the_codec_are_client_errors_in_the_envelope(
    edge: tuple[str, Path],
) -> None:
    """Envoy's codec refuses some requests before any filter; they are the client's doing, not
    an INTERNAL_ERROR (a bug)."""
    url, _ = edge
    cases = [
        # HTTP/1.0 (curl -0): 426 Upgrade Required.
        (b"GET /health/live HTTP/1.0\r\n\r\n", 426, "VALIDATION_ERROR"),
        # Headers past Envoy's limit (the servers' hard one), and more than 100 headers.
        (
            b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Padding: "
            + b"a" * (SERVER_METADATA_HARD_LIMIT + 100)
            + b"\r\n\r\n",
            431,
            "VALIDATION_ERROR",
        ),
        (
            b"GET /" + b"a" * (SERVER_METADATA_HARD_LIMIT + 100) + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            431,
            "VALIDATION_ERROR",
        ),
        (
            b"GET /health/live HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(120))
            + b"\r\n",
            431,
            "VALIDATION_ERROR",
        ),
        # A transfer coding Envoy does not implement.
        (
            b"POST /health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            501,
            "NOT_IMPLEMENTED",
        ),
    ]
    for request, status, code in cases:
        # Sizes just past the limits: Envoy reads all that is sent, so it closes the
        # connection after its answer rather than resetting it.
        raw = await asyncio.to_thread(_raw, url, request)
        answer, error = _envelope_of(raw)
        assert (answer, error["code"]) == (status, code), raw[:300]


async def test_headers_sent_too_slowly_are_a_timeout(edge: tuple[str, Path]) -> None:
    """A client that does not finish its headers within request_headers_timeout (10 s) gets
    408 TIMEOUT_ERROR: retrying may well work, unlike a VALIDATION_ERROR."""
    url, _ = edge
    raw = await asyncio.to_thread(
        _raw, url, b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Partial: 1\r\n", 20.0
    )
    status, error = _envelope_of(raw)
    assert (status, error["code"]) == (408, "TIMEOUT_ERROR"), raw


async def test_a_header_with_an_underscore_is_dropped_not_refused(edge: tuple[str, Path]) -> None:
    """Envoy drops `x_foo` (no server reads such a header, and gRPC's metadata does not take
    `_` for `-`); refusing would answer HTTP/2 with a bare stream reset."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url) as client:
        reply = await client.get("/health/live", headers={"x_foo": "1"})
    # Past the codec: the services are down here, hence 503.
    assert_envelope(reply, 503, "SERVICE_UNAVAILABLE")


async def test_the_access_log_keeps_no_query_string(edge: tuple[str, Path]) -> None:
    """A credential sent in a query string is refused, and not written to the log either."""
    url, log = edge
    secret = "eyJhbGciOiJFUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJl"
    async with httpx.AsyncClient(base_url=url) as client:
        refused = await client.get("/api/v1/auth/me", params={"access_token": secret})
        assert_envelope(refused, 400, "VALIDATION_ERROR")
        unknown = await client.get("/nowhere", params={"token": secret})
        assert_envelope(unknown, 404, "NOT_FOUND")
    ids = [refused.headers["x-request-id"], unknown.headers["x-request-id"]]
    # Envoy flushes its log every 10 s (--file-flush-interval-msec).
    for _ in range(300):
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        logged = [line for line in lines if line.get("request_id") in ids]
        if len(logged) == 2:
            break
        await asyncio.sleep(0.1)
    assert [line["path"] for line in logged] == ["/api/v1/auth/me", "/nowhere"], logged
    assert secret not in log.read_text()


def test_the_edge_header_limits_are_the_servers() -> None:
    """edge.lua's budget is the servers' soft metadata limit and Envoy's codec limit their hard
    one: a server given a grpc.max_metadata_size of its own must not take less than the edge
    lets through."""
    options = dict(SERVER_OPTIONS)
    assert options.get("grpc.max_metadata_size", 8 * 1024) >= SERVER_METADATA_LIMIT
    assert options.get("grpc.absolute_max_metadata_size", 16 * 1024) >= SERVER_METADATA_HARD_LIMIT
    assert SERVER_METADATA_HARD_LIMIT % 1024 == 0


async def test_a_deprecated_path_names_its_successor(edge: tuple[str, Path]) -> None:
    """Seed 001's unversioned paths name the /api/v1 path to use: the twin under /api/v1/,
    or, for the event stream, /api/v1/events/stream (its twin does not exist)."""
    url, _ = edge
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for path, successor in (
            ("/api/tasks", "/api/v1/tasks"),
            ("/api/observability/events/stream", "/api/v1/events/stream"),
        ):
            reply = await client.get(path, params={"limit": "1"})
            info = reply.headers["x-api-deprecation-info"]
            assert info == f"use {successor} (see docs/api.md)", (path, info)
