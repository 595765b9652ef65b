"""The edge's promises over REST: health shapes, the error envelope for every kind of error,
x-request-id on every response, UNIMPLEMENTED as 501, the per-connection flood guard."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import grpc
import httpx
import jwt
from cryptography.hazmat.primitives import serialization

from agentmesh.v1 import health_pb2, health_pb2_grpc
from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, new_user


def test_health_documents(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        health = client.get("/health")
        alias = client.get("/api/v1/health")
        live = client.get("/health/live")
        ready = client.get("/health/ready")
    assert health.status_code == alias.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["services"] == {
        "auth": "up",
        "tasks": "up",
        "agents": "up",
        "messaging": "up",
        "database": "up",
    }
    assert isinstance(body["uptime"], int) and body["version"] and body["timestamp"]
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_malformed_json_is_a_validation_error(mesh: MeshProcess) -> None:
    reply = httpx.post(
        mesh.url + "/api/v1/auth/login",
        content=b'{"username": "x", ',
        headers={"content-type": "application/json"},
    )
    assert_envelope(reply, 400, "VALIDATION_ERROR")


def test_wrong_json_type_is_a_validation_error(mesh: MeshProcess) -> None:
    reply = httpx.post(mesh.url + "/api/v1/auth/login", json={"username": ["a"], "password": 5})
    assert_envelope(reply, 400, "VALIDATION_ERROR")


def test_unknown_path_is_not_found(mesh: MeshProcess) -> None:
    for path in ("/nope", "/api/v1/nothing-here", "/api/v2/tasks"):
        assert_envelope(httpx.get(mesh.url + path), 404, "NOT_FOUND")
    # A known path with a method it does not have.
    assert_envelope(httpx.delete(mesh.url + "/api/v1/auth/login"), 404, "NOT_FOUND")


def test_a_path_refused_before_routing_says_why(mesh: MeshProcess) -> None:
    """Envoy refuses an encoded slash or NUL in the path before any route or request id: the
    envelope still comes, with a message (not the empty body Envoy gives such a reply)."""
    for path in ("/api/v1/tasks/a%2Fb", "/api/v1/tasks/..%2f..%2fetc", "/api/v1/tasks/%00"):
        reply = httpx.get(mesh.url + path)
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "VALIDATION_ERROR" and "path" in error["message"], error


def test_unknown_query_parameter_is_rejected(mesh: MeshProcess) -> None:
    assert_envelope(
        httpx.get(mesh.url + "/health", params={"verbose": "1"}), 400, "VALIDATION_ERROR"
    )


def test_an_unknown_body_field_is_rejected_not_dropped(mesh: MeshProcess) -> None:
    """The proto3 JSON mapping would drop a misspelt field: a task asked for with "prority"
    would be made with the default priority, and answered 201."""
    with httpx.Client(base_url=mesh.url) as client:
        user = new_user()
        token = client.post("/api/v1/auth/register", json=user).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        for path in ("/api/v1/tasks", "/api/tasks"):
            reply = client.post(path, json={"description": "x", "prority": 9}, headers=auth)
            error = assert_envelope(reply, 400, "VALIDATION_ERROR")
            assert error["message"] == 'unknown field "prority" in the request body'
        # Both spellings of a field are the field; a Struct (metadata) holds any keys, at
        # any depth, strings with braces and quotes included.
        task = {
            "description": "x",
            "metadata": {"prority": [1, {"a": '}"]{'}], "n": None},
            "requiredCapabilities": ["echo"],
            "max_attempts": 2,
            "priority": 9,
        }
        made = client.post("/api/v1/tasks", json=task, headers=auth)
        assert made.status_code == 201, made.text
        assert made.json()["priority"] == 9 and made.json()["max_attempts"] == 2
        # Routes with path parameters are checked too; so are sign-up and login.
        task_id = made.json()["task_id"]
        stop = client.post(f"/api/v1/tasks/{task_id}/stop", json={"why": "x"}, headers=auth)
        assert_envelope(stop, 400, "VALIDATION_ERROR")
        login = client.post("/api/v1/auth/login", json={**user, "remember": True})
        assert_envelope(login, 400, "VALIDATION_ERROR")
        # protobuf's parser would take a lone value for a list of one.
        lone = client.post(
            "/api/v1/tasks",
            json={"description": "x", "required_capabilities": "echo"},
            headers=auth,
        )
        error = assert_envelope(lone, 400, "VALIDATION_ERROR")
        assert error["message"] == '"required_capabilities" must be a JSON array'
        # A body that is not an object is left to the transcoder, which refuses it too.
        listed = client.post("/api/v1/tasks", content=b"[1, 2]", headers=auth)
        assert_envelope(listed, 400, "VALIDATION_ERROR")


def _nested(levels: int) -> object:
    """A JSON object whose objects nest ``levels`` deep."""
    value: object = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_a_request_too_deep_or_not_utf8_is_a_validation_error(mesh: MeshProcess) -> None:
    """Free-form JSON nests at most 20 levels: deeper metadata, once accepted, could not be
    handed to an agent nor listed. Past protobuf's own limit (about 33 levels) and for a path
    that is not UTF-8, grpc's parser refuses the request before any handler: still a 400 in
    the envelope, not a 500 with the parser's words."""
    with httpx.Client(base_url=mesh.url) as client:
        token = client.post("/api/v1/auth/register", json=new_user()).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        def create(levels: int) -> httpx.Response:
            task = {"type": "echo", "description": "x", "metadata": _nested(levels)}
            return client.post("/api/v1/tasks", json=task, headers=auth)

        kept = create(20)
        assert kept.status_code == 201, kept.text
        for levels in (21, 32, 40, 99):
            error = assert_envelope(create(levels), 400, "VALIDATION_ERROR")
            assert "deep" in str(error["message"]), error
            assert "protobuf" not in str(error["message"]) and "upb" not in str(error["message"])
        listed = client.get("/api/v1/tasks", headers=auth)
        assert listed.status_code == 200 and listed.json()["total"] == 1, listed.text
        for method, path in (
            ("GET", "/api/v1/tasks/%ff"),
            ("DELETE", "/api/v1/tasks/%C0%AF"),
            ("GET", "/api/v1/tasks?status=%ff"),
        ):
            error = assert_envelope(
                client.request(method, path, headers=auth), 400, "VALIDATION_ERROR"
            )
            assert (
                error["message"] == "the request could not be decoded: a string is not valid UTF-8"
            )


def _random_string(rng: random.Random) -> str:
    """The characters a scanner could trip on inside a JSON string."""
    alphabet = ['"', "\\", "{", "}", "[", "]", ",", ":", " ", "a", "é", "\n"]
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def _random_json(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of every kind, nested up to four deep."""
    kind = rng.choice(["str", "num", "lit"] + (["obj", "arr"] if depth < 4 else []))
    if kind == "str":
        return _random_string(rng)
    if kind == "num":
        return rng.choice([0, -1, 3.5e-7, 12345678901, 1.0])
    if kind == "lit":
        return rng.choice([True, False, None])
    if kind == "arr":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        _random_string(rng) + str(i): _random_json(rng, depth + 1) for i in range(rng.randint(0, 3))
    }


def test_the_body_check_follows_any_json_value(mesh: MeshProcess) -> None:
    """The edge's scanner skips every kind of value, nested and escaped, to find the next
    top-level key: no valid body is refused, and a stray key is found wherever it stands."""
    rng = random.Random(20261124)
    with httpx.Client(base_url=mesh.url) as client:
        token = client.post("/api/v1/auth/register", json=new_user()).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}", "content-type": "application/json"}
        for round_ in range(40):
            fields: list[tuple[str, object]] = [
                ("metadata", {"v": _random_json(rng)}),
                ("title", f"scan {round_}"),
                # Free text, which keeps any character (a title is a one-line label).
                ("description", f"scan {round_} {_random_string(rng)}"),
            ]
            rng.shuffle(fields)
            spaces = rng.choice(["", " ", "\n\t "])
            parts = [f"{spaces}{json.dumps(k)}{spaces}:{spaces}{json.dumps(v)}" for k, v in fields]
            body = "{" + ",".join(parts) + spaces + "}"
            made = client.post("/api/v1/tasks", content=body.encode(), headers=auth)
            assert made.status_code == 201, (body, made.text)
            stray = f"x{round_}"
            parts.insert(
                rng.randint(0, len(parts)), f"{json.dumps(stray)}:{json.dumps(_random_json(rng))}"
            )
            refused = client.post(
                "/api/v1/tasks", content=("{" + ",".join(parts) + "}").encode(), headers=auth
            )
            error = assert_envelope(refused, 400, "VALIDATION_ERROR")
            assert error["message"] == f'unknown field "{stray}" in the request body'


def test_missing_token_is_rejected_at_the_edge(mesh: MeshProcess) -> None:
    reply = httpx.post(mesh.url + "/api/v1/tasks", json={"type": "echo", "description": "x"})
    assert_envelope(reply, 401, "AUTH_REQUIRED")


def test_expired_token_is_token_expired(mesh: MeshProcess) -> None:
    # Signed with the mesh's own key, so only the expiry is wrong.
    pem = (mesh.data_dir / "keys" / "signing-key.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    kid = httpx.get(mesh.url + "/.well-known/jwks.json").json()["keys"][0]["kid"]
    now = int(time.time())
    claims = {
        "sub": "someone",
        "iss": "agentmesh",
        "aud": "agentmesh",
        "typ": "access",
        "jti": "j1",
        "iat": now - 7200,
        "exp": now - 3600,
    }
    token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})  # type: ignore[arg-type]
    reply = httpx.get(mesh.url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert_envelope(reply, 401, "TOKEN_EXPIRED")


def test_role_without_permission_is_403(mesh: MeshProcess) -> None:
    token = httpx.post(mesh.url + "/api/v1/auth/register", json=new_user()).json()["access_token"]
    # Seed 004: the "user" role may not read agents, and user administration is for admins.
    for path in ("/api/v1/agents", "/api/v1/users"):
        reply = httpx.get(mesh.url + path, headers={"Authorization": f"Bearer {token}"})
        assert_envelope(reply, 403, "INSUFFICIENT_PERMISSIONS")


def test_every_response_has_a_request_id(mesh: MeshProcess) -> None:
    seen = set()
    with httpx.Client(base_url=mesh.url) as client:
        replies = [
            client.get("/health"),
            client.get("/nope"),
            client.post("/api/v1/auth/login", json={"username": "a", "password": "b"}),
            client.get("/api/v1/auth/me"),
            # A client's own id is replaced at the edge: ids are the mesh's, not the caller's.
            client.get("/health/live", headers={"x-request-id": "forged"}),
        ]
    for reply in replies:
        rid = reply.headers.get("x-request-id")
        assert rid and rid != "forged", reply
        seen.add(rid)
    assert len(seen) == len(replies)


def test_grpc_only_headers_do_not_leak_into_rest(mesh: MeshProcess) -> None:
    reply = httpx.get(mesh.url + "/health/live")
    for header in ("grpc-status", "grpc-message", "x-http-status"):
        assert header not in reply.headers


def test_envoy_log_is_json(mesh: MeshProcess) -> None:
    httpx.get(mesh.url + "/health/live")
    log = Path(mesh.data_dir / "logs" / "envoy.log").read_text()
    assert '"component":"envoy"' in log.replace(" ", "")


def test_oversized_body_is_413(mesh: MeshProcess) -> None:
    big = {"email": "big@example.com", "password": "x" * (2 * 1024 * 1024)}
    assert_envelope(
        httpx.post(mesh.url + "/api/v1/auth/register", json=big), 413, "VALIDATION_ERROR"
    )


def test_flood_guard_limits_each_connection(tmp_path: Path) -> None:
    """AGENTMESH_EDGE_RATE_LIMIT caps the requests of one client connection per second: REST
    gets 429 in the envelope with Retry-After, gRPC RESOURCE_EXHAUSTED (not UNAVAILABLE, which
    clients retry at once); another connection is not held back."""
    limit = 5
    with MeshProcess(data_dir=tmp_path, env={"AGENTMESH_EDGE_RATE_LIMIT": str(limit)}) as mesh:
        with httpx.Client(base_url=mesh.url) as client:  # one keep-alive connection
            statuses = [client.get("/health/live") for _ in range(limit * 3)]
        assert [r.status_code for r in statuses[:limit]] == [200] * limit
        refused = [r for r in statuses if r.status_code != 200]
        assert refused, "the flood guard let every request through"
        error = assert_envelope(refused[0], 429, "RATE_LIMIT_EXCEEDED")
        assert error["details"] == {"retry_after": "1"}
        assert refused[0].headers["retry-after"] == "1"
        # A new connection has a bucket of its own.
        assert httpx.get(mesh.url + "/health/live").status_code == 200

        with grpc.insecure_channel(mesh.url.removeprefix("http://")) as channel:
            stub = health_pb2_grpc.HealthServiceStub(channel)
            codes = []
            for _ in range(limit * 3):
                try:
                    stub.GetLiveness(health_pb2.GetLivenessRequest(), timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
        assert codes[:limit] == [grpc.StatusCode.OK] * limit
        assert set(codes[limit:]) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
