"""Register, login and me over REST through Envoy, on SQLite and on PostgreSQL."""

from __future__ import annotations

import httpx

from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, new_user


def register(client: httpx.Client, user: dict[str, str]) -> httpx.Response:
    return client.post("/api/v1/auth/register", json=user)


def test_register_login_me(any_mesh: MeshProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=any_mesh.url) as client:
        created = register(client, user)
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 3600
        assert body["access_token"].count(".") == 2
        assert body["refresh_token"].startswith("amr_")
        assert body["user"]["email"] == user["email"]
        assert body["user"]["username"] == user["username"]
        assert body["user"]["name"] == user["full_name"]
        assert body["user"]["roles"] == ["user"]

        # Login by username (seed 004) and by email (seed 001).
        by_name = client.post(
            "/api/v1/auth/login",
            json={"username": user["username"], "password": user["password"]},
        )
        by_email = client.post(
            "/api/v1/auth/login", json={"email": user["email"], "password": user["password"]}
        )
        assert by_name.status_code == by_email.status_code == 200
        token = by_email.json()["access_token"]

        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["user"]["id"] == body["user"]["id"]
        assert me.json()["user"]["last_login"]


def test_seed_001_field_names_are_accepted(mesh: MeshProcess) -> None:
    user = new_user()
    payload = {"email": user["email"], "password": user["password"], "fullName": "Jane Roe"}
    with httpx.Client(base_url=mesh.url) as client:
        created = client.post("/api/auth/register", json=payload)
        assert created.status_code == 201, created.text
        # 001 reads "token"; the canonical field is "access_token".
        assert created.json()["token"] == created.json()["access_token"]
        assert created.json()["user"]["name"] == "Jane Roe"


def test_unversioned_paths_are_deprecated_aliases(mesh: MeshProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=mesh.url) as client:
        register(client, user)
        creds = {"email": user["email"], "password": user["password"]}
        old = client.post("/api/auth/login", json=creds)
        new = client.post("/api/v1/auth/login", json=creds)
    assert old.status_code == new.status_code == 200
    assert old.headers["x-api-deprecation-date"]
    assert "/api/v1/auth/login" in old.headers["x-api-deprecation-info"]
    assert "x-api-deprecation-date" not in new.headers


def test_duplicate_user_is_409(any_mesh: MeshProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=any_mesh.url) as client:
        assert register(client, user).status_code == 201
        again = register(client, {**user, "username": user["username"] + "x"})
        assert_envelope(again, 409, "USER_EXISTS")
        # Usernames and emails are unique regardless of case.
        shouted = {**user, "email": user["email"].upper(), "username": ""}
        assert_envelope(register(client, shouted), 409, "USER_EXISTS")


def test_bad_registrations_are_validation_errors(mesh: MeshProcess) -> None:
    cases = [
        ("password", {"password": "short1"}),
        ("password", {"password": "lettersonly"}),
        ("email", {"email": "not-an-email"}),
        ("username", {"username": "no spaces allowed"}),
    ]
    with httpx.Client(base_url=mesh.url) as client:
        for field, change in cases:
            error = assert_envelope(
                register(client, {**new_user(), **change}), 400, "VALIDATION_ERROR"
            )
            assert error["details"] == {"field": field}
        huge = {**new_user(), "password": "a1" * 200}
        assert_envelope(register(client, huge), 400, "VALIDATION_ERROR")


def test_wrong_password_and_unknown_user_look_the_same(mesh: MeshProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=mesh.url) as client:
        register(client, user)
        wrong = client.post(
            "/api/v1/auth/login", json={"username": user["username"], "password": "nope-123456"}
        )
        unknown = client.post(
            "/api/v1/auth/login", json={"username": "nobody-here", "password": "nope-123456"}
        )
    a = assert_envelope(wrong, 401, "INVALID_CREDENTIALS")
    b = assert_envelope(unknown, 401, "INVALID_CREDENTIALS")
    assert a["message"] == b["message"]


def test_me_needs_a_valid_token(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        assert_envelope(client.get("/api/v1/auth/me"), 401, "AUTH_REQUIRED")
        for bad in ("Bearer abc.def.ghi", "Bearer", "Basic dXNlcjpwYXNz", "Bearer amr_x"):
            reply = client.get("/api/v1/auth/me", headers={"Authorization": bad})
            assert_envelope(reply, 401, "AUTH_REQUIRED")


def test_token_in_query_string_is_refused(mesh: MeshProcess) -> None:
    user = new_user()
    with httpx.Client(base_url=mesh.url) as client:
        token = register(client, user).json()["access_token"]
        reply = client.get("/api/v1/auth/me", params={"access_token": token})
    assert_envelope(reply, 400, "VALIDATION_ERROR")


def test_jwks_is_public_and_holds_the_signing_key(mesh: MeshProcess) -> None:
    reply = httpx.get(mesh.url + "/.well-known/jwks.json")
    assert reply.status_code == 200
    (key,) = reply.json()["keys"]
    assert key["kty"] == "EC" and key["alg"] == "ES256" and key["crv"] == "P-256"
    assert key["kid"] and key["x"] and key["y"]
    assert "n" not in key and "d" not in key  # never a private member
