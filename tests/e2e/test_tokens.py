"""Refresh tokens: rotation, replay detection, concurrency, logout and password changes."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from servers.common.auth import SESSION_ENDED, TOKEN_ENDED
from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, new_user


def _signup(url: str) -> tuple[dict[str, str], dict[str, object]]:
    user = new_user()
    reply = httpx.post(url + "/api/v1/auth/register", json=user)
    assert reply.status_code == 201, reply.text
    return user, reply.json()


def _refresh(url: str, token: str) -> httpx.Response:
    return httpx.post(url + "/api/v1/auth/refresh", json={"refresh_token": token})


def _claims(access_token: str) -> dict[str, object]:
    payload = access_token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def _me(url: str, access_token: str) -> httpx.Response:
    return httpx.get(url + "/api/v1/auth/me", headers=_bearer(access_token))


def _assert_ended(url: str, access_token: str, message: str = TOKEN_ENDED) -> None:
    """The access token is refused at once by the auth service and by another one."""
    for path in ("/api/v1/auth/me", "/api/v1/tasks"):
        error = assert_envelope(
            httpx.get(url + path, headers=_bearer(access_token)), 401, "AUTH_REQUIRED"
        )
        assert error["message"] == message, error


def test_refresh_rotates_and_a_replay_revokes_the_family(any_mesh: MeshProcess) -> None:
    _, first = _signup(any_mesh.url)
    second = _refresh(any_mesh.url, str(first["refresh_token"]))
    assert second.status_code == 200, second.text
    pair = second.json()
    assert pair["refresh_token"] != first["refresh_token"]
    assert _claims(pair["access_token"])["sub"] == _claims(str(first["access_token"]))["sub"]

    # The first token was spent: presenting it again is a replay...
    error = assert_envelope(
        _refresh(any_mesh.url, str(first["refresh_token"])), 401, "AUTH_REQUIRED"
    )
    assert error["details"] == {"revoked": "family"}
    # ...which revokes the whole family, including the newest token, and ends the session's
    # access tokens: one of its two holders is a thief.
    assert_envelope(_refresh(any_mesh.url, pair["refresh_token"]), 401, "AUTH_REQUIRED")
    for access in (first["access_token"], pair["access_token"]):
        _assert_ended(any_mesh.url, str(access), SESSION_ENDED)


def test_refresh_token_in_the_authorization_header(mesh: MeshProcess) -> None:
    _, tokens = _signup(mesh.url)
    reply = httpx.post(
        mesh.url + "/api/v1/auth/refresh",
        json={},
        headers={"Authorization": f"Bearer {tokens['refresh_token']}"},
    )
    assert reply.status_code == 200, reply.text
    # Seed 001's unversioned path with its body-less form.
    again = httpx.post(
        mesh.url + "/api/auth/refresh",
        headers={"Authorization": f"Bearer {reply.json()['refresh_token']}"},
        json={},
    )
    assert again.status_code == 200 and again.headers["x-api-deprecation-date"]


def test_tokens_are_not_interchangeable(mesh: MeshProcess) -> None:
    _, tokens = _signup(mesh.url)
    # An access token is not a refresh token...
    assert_envelope(_refresh(mesh.url, str(tokens["access_token"])), 401, "AUTH_REQUIRED")
    # ...nor the reverse, at the edge or straight at a server.
    reply = httpx.get(
        mesh.url + "/api/v1/auth/me", headers={"Authorization": f"Bearer {tokens['refresh_token']}"}
    )
    assert_envelope(reply, 401, "AUTH_REQUIRED")
    assert_envelope(_refresh(mesh.url, ""), 401, "AUTH_REQUIRED")


@pytest.mark.timeout(120)
async def test_twenty_concurrent_refreshes_one_wins(any_mesh: MeshProcess) -> None:
    _, tokens = _signup(any_mesh.url)
    async with httpx.AsyncClient(base_url=any_mesh.url, timeout=30) as client:
        replies = await asyncio.gather(
            *(
                client.post("/api/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
                for _ in range(20)
            )
        )
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200] + [401] * 19, [r.text for r in replies if r.status_code != 401]


def test_logout_revokes_refresh_tokens(mesh: MeshProcess) -> None:
    user, tokens = _signup(mesh.url)
    second = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": user["username"], "password": user["password"]},
    ).json()
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    # Logging out one session (by its refresh token) leaves the other.
    out = httpx.post(
        mesh.url + "/api/v1/auth/logout",
        json={"refresh_token": tokens["refresh_token"]},
        headers=auth,
    )
    assert out.status_code == 200
    assert_envelope(_refresh(mesh.url, str(tokens["refresh_token"])), 401, "AUTH_REQUIRED")
    # Its access token ends with it, in every service...
    _assert_ended(mesh.url, str(tokens["access_token"]), SESSION_ENDED)
    # ...and the other session goes on, refreshes included.
    assert _me(mesh.url, str(second["access_token"])).status_code == 200
    alive = _refresh(mesh.url, second["refresh_token"])
    assert alive.status_code == 200
    assert _me(mesh.url, alive.json()["access_token"]).status_code == 200
    # Logging out without a refresh token ends every session, access tokens included, in
    # every service.
    everything = httpx.post(
        mesh.url + "/api/v1/auth/logout", json={}, headers=_bearer(alive.json()["access_token"])
    )
    assert everything.status_code == 200, everything.text
    assert_envelope(_refresh(mesh.url, alive.json()["refresh_token"]), 401, "AUTH_REQUIRED")
    for access in (second["access_token"], alive.json()["access_token"]):
        _assert_ended(mesh.url, str(access))


def test_change_password(mesh: MeshProcess) -> None:
    user, tokens = _signup(mesh.url)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    wrong = httpx.post(
        mesh.url + "/api/v1/auth/change-password",
        json={"current_password": "not-it-123", "new_password": "brand-new-pass-1"},
        headers=auth,
    )
    assert_envelope(wrong, 401, "INVALID_CREDENTIALS")
    weak = httpx.post(
        mesh.url + "/api/v1/auth/change-password",
        json={"current_password": user["password"], "new_password": "short"},
        headers=auth,
    )
    assert_envelope(weak, 400, "VALIDATION_ERROR")
    ok = httpx.post(
        mesh.url + "/api/v1/auth/change-password",
        json={"current_password": user["password"], "new_password": "brand-new-pass-1"},
        headers=auth,
    )
    assert ok.status_code == 200, ok.text
    changed = ok.json()
    assert changed["message"] == "Password changed successfully"
    assert changed["token_type"] == "bearer"
    assert changed["expires_in"] == tokens["expires_in"]
    # Every session from before ends, access tokens included, in every service...
    assert_envelope(_refresh(mesh.url, str(tokens["refresh_token"])), 401, "AUTH_REQUIRED")
    _assert_ended(mesh.url, str(tokens["access_token"]))
    # ...and the caller goes on with the new one.
    me = _me(mesh.url, changed["access_token"])
    assert me.status_code == 200 and me.json()["user"]["username"] == user["username"], me.text
    tasks = httpx.get(mesh.url + "/api/v1/tasks", headers=_bearer(changed["access_token"]))
    assert tasks.status_code == 200, tasks.text
    renewed = _refresh(mesh.url, changed["refresh_token"])
    assert renewed.status_code == 200, renewed.text
    # The new password signs in; the old one does not.
    old = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": user["username"], "password": user["password"]},
    )
    assert_envelope(old, 401, "INVALID_CREDENTIALS")
    new = httpx.post(
        mesh.url + "/api/v1/auth/login",
        json={"username": user["username"], "password": "brand-new-pass-1"},
    )
    assert new.status_code == 200


def test_update_me_and_validate(mesh: MeshProcess) -> None:
    user, tokens = _signup(mesh.url)
    auth = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert httpx.get(mesh.url + "/api/v1/auth/me", headers=auth).json()["user"]["name"]
    updated = httpx.put(mesh.url + "/api/v1/auth/me", json={"name": "Jane Doe"}, headers=auth)
    assert updated.status_code == 200 and updated.json()["user"]["name"] == "Jane Doe"
    # Read right after the write: never the profile from before it.
    again = httpx.get(mesh.url + "/api/v1/auth/me", headers=auth)
    assert again.json()["user"]["name"] == "Jane Doe"
    assert updated.json()["user"]["email"] == user["email"]
    bad = httpx.put(mesh.url + "/api/v1/auth/me", json={"email": "nope"}, headers=auth)
    assert_envelope(bad, 400, "VALIDATION_ERROR")
    valid = httpx.get(mesh.url + "/api/v1/auth/validate", headers=auth)
    assert valid.status_code == 200
    assert valid.json()["valid"] is True and valid.json()["user"]["name"] == "Jane Doe"
    assert_envelope(httpx.get(mesh.url + "/api/v1/auth/validate"), 401, "AUTH_REQUIRED")
