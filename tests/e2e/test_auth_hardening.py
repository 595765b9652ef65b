"""The auth audit's findings, replayed through Envoy: one login budget per account whatever the
spelling, ChangePassword held to it, a disabled account's token managing no credentials, one
account per e-mail address in any Unicode form, and sign-out by another account's refresh token.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from itertools import count

import httpx
import pytest

from servers.launcher import MeshProcess
from tests.e2e.test_login_limits import _assert_limited
from tests.helpers import assert_envelope, grant_role, new_user

LIMIT = 10  # AGENTMESH_LOGIN_LIMIT's default
# Source addresses on the loopback network (127.0.0.0/8): Envoy appends each to
# X-Forwarded-For, so the auth service counts them as different clients.
_addresses = (f"127.0.{n // 250}.{n % 250 + 2}" for n in count(1))


def _from_elsewhere(url: str) -> httpx.Client:
    """A client connecting to the mesh from an address of its own."""
    address = next(_addresses)
    return httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address=address))


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshProcess]:
    """A mesh with the default login limits (the shared meshes lift them)."""
    with MeshProcess(data_dir=tmp_path_factory.mktemp("limited")) as mesh:
        yield mesh


def _register(url: str, user: dict[str, str]) -> dict[str, object]:
    with _from_elsewhere(url) as client:
        reply = client.post("/api/v1/auth/register", json=user)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert isinstance(body, dict)
    return body


def _login(url: str, credentials: dict[str, str]) -> httpx.Response:
    with _from_elsewhere(url) as client:
        return client.post("/api/v1/auth/login", json=credentials)


def test_every_spelling_of_an_account_spends_one_login_budget(limited: MeshProcess) -> None:
    user = new_user()
    _register(limited.url, user)
    spellings = [
        {"username": user["username"]},
        {"email": user["email"]},
        {"username": user["username"].upper()},
        {"email": user["email"].upper()},
    ]
    # Ten guesses, from ten addresses, under four spellings...
    for n in range(LIMIT):
        reply = _login(limited.url, {**spellings[n % 4], "password": "wrong-pass-1"})
        assert_envelope(reply, 401, "INVALID_CREDENTIALS")
    # ...spend the account's hour: the eleventh is refused whatever the spelling or password.
    for spelling in spellings:
        _assert_limited(_login(limited.url, {**spelling, "password": user["password"]}))


def test_change_password_guesses_spend_the_login_budget(limited: MeshProcess) -> None:
    user = new_user()
    token = _register(limited.url, user)["access_token"]
    with httpx.Client(base_url=limited.url, headers={"Authorization": f"Bearer {token}"}) as c:
        for _ in range(LIMIT):
            wrong = c.post(
                "/api/v1/auth/change-password",
                json={"current_password": "wrong-pass-1", "new_password": "brand-new-pass-1"},
            )
            assert_envelope(wrong, 401, "INVALID_CREDENTIALS")
        right = c.post(
            "/api/v1/auth/change-password",
            json={"current_password": user["password"], "new_password": "brand-new-pass-1"},
        )
        _assert_limited(right)
    # The same budget as signing in.
    _assert_limited(
        _login(limited.url, {"username": user["username"], "password": user["password"]})
    )


def test_one_address_registers_at_most_ten_accounts_an_hour(limited: MeshProcess) -> None:
    """Seed 001's authentication class holds for registration too: each one hashes a password
    (tens of milliseconds of CPU) and makes an account, so one client address gets ten an
    hour, whether they succeed or name a taken account. Invalid requests, which cost nothing,
    are refused without counting; other addresses keep their own budget."""
    with _from_elsewhere(limited.url) as client:
        weak = {**new_user(), "password": "short"}
        assert_envelope(client.post("/api/v1/auth/register", json=weak), 400, "VALIDATION_ERROR")
        first = new_user()
        assert client.post("/api/v1/auth/register", json=first).status_code == 201
        taken = client.post("/api/v1/auth/register", json=first)
        assert_envelope(taken, 409, "USER_EXISTS")
        for _ in range(LIMIT - 2):
            reply = client.post("/api/v1/auth/register", json=new_user())
            assert reply.status_code == 201, reply.text
        refused = client.post("/api/v1/auth/register", json=new_user())
        _assert_limited(refused)
        assert "registrations" in refused.json()["error"]["message"]
    _register(limited.url, new_user())  # from an address of its own


@pytest.fixture
def database(
    request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess
) -> str | None:
    """The PostgreSQL database `any_mesh` runs on, or None for the SQLite one."""
    return None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))


def _signed_in(client: httpx.Client, user: dict[str, str]) -> dict[str, str]:
    reply = client.post(
        "/api/v1/auth/login", json={"username": user["username"], "password": user["password"]}
    )
    assert reply.status_code == 200, reply.text
    return {"Authorization": f"Bearer {reply.json()['access_token']}"}


def test_a_disabled_accounts_token_manages_no_credentials(
    any_mesh: MeshProcess, database: str | None
) -> None:
    admin, user, other_admin = new_user(), new_user(), new_user()
    with httpx.Client(base_url=any_mesh.url) as client:
        for account in (admin, user, other_admin):
            assert client.post("/api/v1/auth/register", json=account).status_code == 201
        for account in (admin, other_admin):
            grant_role(any_mesh, account["username"], "admin", database)
        as_admin, as_user = _signed_in(client, admin), _signed_in(client, user)
        as_other_admin = _signed_in(client, other_admin)
        user_id = client.get("/api/v1/auth/me", headers=as_user).json()["user"]["id"]
        other_id = client.get("/api/v1/auth/me", headers=as_other_admin).json()["user"]["id"]
        key = client.post(
            "/api/v1/auth/api-keys", json={"name": "before", "scopes": ["read"]}, headers=as_user
        )
        assert key.status_code == 201, key.text
        key_id = key.json()["api_key"]["key_id"]

        for account_id in (user_id, other_id):
            off = client.put(
                f"/api/v1/users/{account_id}", json={"disabled": True}, headers=as_admin
            )
            assert off.status_code == 200, off.text

        # The access tokens are still well-signed JWTs, but no credential or account is made
        # or changed with them.
        mine = f"/api/v1/users/{user_id}"
        backdoor: dict[str, object] = {k: v for k, v in new_user().items() if k != "full_name"}
        backdoor["roles"] = ["admin"]
        for reply in (
            client.post(
                "/api/v1/auth/api-keys", json={"name": "after", "scopes": ["read"]}, headers=as_user
            ),
            client.get("/api/v1/auth/api-keys", headers=as_user),
            client.delete(f"/api/v1/auth/api-keys/{key_id}", headers=as_user),
            client.put(mine, json={"name": "still here"}, headers=as_user),
            client.get(mine, headers=as_user),
            client.get("/api/v1/users", headers=as_other_admin),
            client.post("/api/v1/users", json=backdoor, headers=as_other_admin),
            client.put(
                f"/api/v1/users/{user_id}/roles", json={"roles": ["admin"]}, headers=as_other_admin
            ),
            client.put(
                f"/api/v1/users/{user_id}", json={"disabled": False}, headers=as_other_admin
            ),
        ):
            assert_envelope(reply, 401, "AUTH_REQUIRED")
        record = client.get(mine, headers=as_admin).json()
        assert record["disabled"] is True and record["roles"] == ["user"]
        assert record["name"] != "still here"


def test_an_address_in_another_unicode_form_is_the_same_account(any_mesh: MeshProcess) -> None:
    tag = secrets.token_hex(4)
    composed, decomposed = f"b\u00f6b-{tag}@example.com", f"bo\u0308b-{tag}@example.com"
    password = f"pass-{tag}-42"
    with httpx.Client(base_url=any_mesh.url) as client:
        first = client.post("/api/v1/auth/register", json={"email": composed, "password": password})
        assert first.status_code == 201, first.text
        twin = client.post(
            "/api/v1/auth/register", json={"email": decomposed, "password": password}
        )
        assert_envelope(twin, 409, "USER_EXISTS")
        signed_in = client.post(
            "/api/v1/auth/login", json={"email": decomposed.upper(), "password": password}
        )
        assert signed_in.status_code == 200, signed_in.text
        assert signed_in.json()["user"]["id"] == first.json()["user"]["id"]
        assert signed_in.json()["user"]["email"] == composed


@pytest.mark.parametrize(
    "email", ["ctl\u0000x", "bel\u0007x", "rlo\u202ex", "zw\u200bsp", "\u200bzw", "bom\ufeffx"]
)
def test_invisible_characters_in_an_address_are_refused(any_mesh: MeshProcess, email: str) -> None:
    address = f"{email}-{secrets.token_hex(4)}@example.com"
    reply = httpx.post(
        any_mesh.url + "/api/v1/auth/register", json={"email": address, "password": "pass-word-42"}
    )
    error = assert_envelope(reply, 400, "VALIDATION_ERROR")
    assert error["details"] == {"field": "email"}
    # Signing in with it is an unknown account, on every database; with a NUL, which no text
    # field of any request may hold, a 400 as for every RPC (docs/api.md).
    login = {"email": address, "password": "pass-word-42"}
    status, code = (400, "VALIDATION_ERROR") if "\x00" in email else (401, "INVALID_CREDENTIALS")
    assert_envelope(httpx.post(any_mesh.url + "/api/v1/auth/login", json=login), status, code)


def test_a_password_needs_an_ascii_digit(any_mesh: MeshProcess) -> None:
    user = {**new_user(), "password": "\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668a"}
    reply = httpx.post(any_mesh.url + "/api/v1/auth/register", json=user)
    error = assert_envelope(reply, 400, "VALIDATION_ERROR")
    assert error["details"] == {"field": "password"}


def test_logout_with_another_accounts_refresh_token_ends_that_session(
    any_mesh: MeshProcess,
) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        alice = client.post("/api/v1/auth/register", json=new_user()).json()
        bob = client.post("/api/v1/auth/register", json=new_user()).json()
        out = client.post(
            "/api/v1/auth/logout",
            json={"refresh_token": bob["refresh_token"]},
            headers={"Authorization": f"Bearer {alice['access_token']}"},
        )
        assert out.status_code == 200 and out.json() == {"message": "Logged out"}
        # "Logged out" is true: the session that token belongs to is over.
        refreshed = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": bob["refresh_token"]}
        )
        assert_envelope(refreshed, 401, "AUTH_REQUIRED")
        mine = client.post("/api/v1/auth/refresh", json={"refresh_token": alice["refresh_token"]})
        assert mine.status_code == 200, mine.text
