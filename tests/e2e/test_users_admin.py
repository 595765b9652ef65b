"""User administration end to end: admins manage every account over /api/v1/users (and the
deprecated /api/users); anyone else reads and edits only its own record, and another user's
record answers 404 as if it did not exist. Role changes show at the next token refresh; a
disabled account can neither refresh nor sign in.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import httpx
import pytest

from agentmesh.v1 import users_pb2, users_pb2_grpc
from servers.common.auth import TOKEN_ENDED
from servers.launcher import MeshProcess
from tests.helpers import assert_envelope, error_reason, grant_role, new_user


@dataclass(frozen=True)
class Account:
    username: str
    email: str
    password: str
    name: str
    id: str
    token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


MakeAdmin = Callable[[], Account]


def _register(client: httpx.Client) -> Account:
    user = new_user()
    reply = client.post("/api/v1/auth/register", json=user)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    return Account(
        username=user["username"],
        email=user["email"],
        password=user["password"],
        name=user["full_name"],
        id=body["user"]["id"],
        token=body["access_token"],
        refresh_token=body["refresh_token"],
    )


def _login(client: httpx.Client, username: str, password: str) -> httpx.Response:
    return client.post("/api/v1/auth/login", json={"username": username, "password": password})


def _signed_in_again(client: httpx.Client, account: Account) -> Account:
    reply = _login(client, account.username, account.password)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    return Account(
        username=account.username,
        email=account.email,
        password=account.password,
        name=account.name,
        id=account.id,
        token=body["access_token"],
        refresh_token=body["refresh_token"],
    )


def _make_admin(target: MeshProcess, database_url: str | None) -> Account:
    with httpx.Client(base_url=target.url) as client:
        account = _register(client)
        grant_role(target, account.username, "admin", database_url)
        return _signed_in_again(client, account)


@pytest.fixture(scope="module")
def admin(mesh: MeshProcess) -> Account:
    """One admin on the SQLite `mesh` for this module's tests (none of them changes it)."""
    return _make_admin(mesh, None)


@pytest.fixture
def any_admin(request: pytest.FixtureRequest, any_mesh: MeshProcess, mesh: MeshProcess) -> Account:
    """A fresh admin on `any_mesh`, whichever database it runs on."""
    url = None if any_mesh is mesh else str(request.getfixturevalue("postgres_url"))
    return _make_admin(any_mesh, url)


def _claims(token: str) -> dict[str, object]:
    """The payload of a JWT, not verified (only to read what the token says)."""
    payload = token.split(".")[1]
    decoded = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    claims = json.loads(decoded)
    assert isinstance(claims, dict)
    return claims


def test_admin_lists_users_in_pages(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url, headers=admin.headers) as client:
        for _ in range(3):
            _register(client)
        # The shared mesh may hold more users than a page: read them all, page by page.
        ids: list[str] = []
        while True:
            everyone = client.get("/api/v1/users", params={"limit": 100, "offset": len(ids)})
            assert everyone.status_code == 200, everyone.text
            ids += [u["id"] for u in everyone.json()["users"]]
            if not everyone.json()["has_more"]:
                break
        total = everyone.json()["total"]
        assert total >= 4 and len(ids) == total == len(set(ids))
        assert admin.id in ids

        default = client.get("/api/v1/users")
        assert default.status_code == 200, default.text
        page = default.json()
        assert page["limit"] == 50 and page["offset"] == 0 and page["total"] == total
        assert len(page["users"]) == min(total, 50)
        assert page["has_more"] is (total > 50)
        assert all("password" not in json.dumps(u) for u in page["users"])

        window = client.get("/api/v1/users", params={"limit": 2, "offset": 1})
        assert window.status_code == 200, window.text
        body = window.json()
        assert body["limit"] == 2 and body["offset"] == 1 and body["total"] == total
        assert [u["id"] for u in body["users"]] == ids[1:3]
        assert body["has_more"] is (3 < total)

        beyond = client.get("/api/v1/users", params={"offset": total})
        assert beyond.status_code == 200, beyond.text
        assert beyond.json()["users"] == [] and beyond.json()["has_more"] is False
        assert_envelope(client.get("/api/v1/users", params={"limit": 101}), 400, "VALIDATION_ERROR")
        assert_envelope(client.get("/api/v1/users", params={"offset": -1}), 400, "VALIDATION_ERROR")


def test_admin_creates_reads_updates_and_deletes_a_user(
    any_mesh: MeshProcess, any_admin: Account
) -> None:
    new = new_user()
    with httpx.Client(base_url=any_mesh.url) as client:
        created = client.post(
            "/api/v1/users",
            json={
                "username": new["username"],
                "email": new["email"],
                "password": new["password"],
                "name": "Made By Admin",
                "roles": ["developer"],
            },
            headers=any_admin.headers,
        )
        assert created.status_code == 201, created.text
        user = created.json()
        assert user["id"]
        assert user["username"] == new["username"] and user["email"] == new["email"]
        assert user["name"] == "Made By Admin"
        assert user["roles"] == ["developer"]
        assert user["disabled"] is False

        # The new account signs in with its password and carries its roles.
        login = _login(client, new["username"], new["password"])
        assert login.status_code == 200, login.text
        assert _claims(login.json()["access_token"])["roles"] == ["developer"]
        own_token = login.json()["access_token"]
        own_refresh = login.json()["refresh_token"]
        key = client.post(
            "/api/v1/auth/api-keys",
            json={"name": "k", "scopes": ["read"]},
            headers={"Authorization": f"Bearer {own_token}"},
        )
        assert key.status_code == 201, key.text
        own_key = key.json()["key"]

        fetched = client.get(f"/api/v1/users/{user['id']}", headers=any_admin.headers)
        assert fetched.status_code == 200, fetched.text
        # The same record, now with the sign-in just made.
        assert fetched.json()["last_login"]
        assert {k: v for k, v in fetched.json().items() if k != "last_login"} == user

        renamed = new_user()
        updated = client.put(
            f"/api/v1/users/{user['id']}",
            json={"username": renamed["username"], "email": renamed["email"], "name": "Renamed"},
            headers=any_admin.headers,
        )
        assert updated.status_code == 200, updated.text
        assert updated.json()["username"] == renamed["username"]
        assert updated.json()["email"] == renamed["email"]
        assert updated.json()["name"] == "Renamed"
        assert updated.json()["roles"] == ["developer"]
        again = client.get(f"/api/v1/users/{user['id']}", headers=any_admin.headers).json()
        assert again["username"] == renamed["username"] and again["name"] == "Renamed"
        assert _login(client, renamed["username"], new["password"]).status_code == 200
        assert_envelope(
            _login(client, new["username"], new["password"]), 401, "INVALID_CREDENTIALS"
        )

        # Taken names are refused on create and on update alike.
        duplicate = client.post(
            "/api/v1/users",
            json={"username": new_user()["username"], "email": renamed["email"]},
            headers=any_admin.headers,
        )
        assert_envelope(duplicate, 409, "USER_EXISTS")
        clash = client.put(
            f"/api/v1/users/{user['id']}",
            json={"username": any_admin.username},
            headers=any_admin.headers,
        )
        assert_envelope(clash, 409, "USER_EXISTS")

        deleted = client.delete(f"/api/v1/users/{user['id']}", headers=any_admin.headers)
        assert deleted.status_code == 204, deleted.text
        assert deleted.content == b""
        gone = client.get(f"/api/v1/users/{user['id']}", headers=any_admin.headers)
        assert_envelope(gone, 404, "NOT_FOUND")
        assert_envelope(
            client.delete(f"/api/v1/users/{user['id']}", headers=any_admin.headers),
            404,
            "NOT_FOUND",
        )
        # The deleted account's sessions and keys end with it.
        assert_envelope(
            client.get("/api/v1/auth/me", headers={"X-API-Key": own_key}), 401, "AUTH_REQUIRED"
        )
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {own_token}"})
        assert_envelope(me, 401, "AUTH_REQUIRED")
        refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": own_refresh})
        assert_envelope(refresh, 401, "AUTH_REQUIRED")
        assert_envelope(
            _login(client, renamed["username"], new["password"]), 401, "INVALID_CREDENTIALS"
        )


def test_bad_user_creations(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url, headers=admin.headers) as client:
        taken = _register(client)
        cases: list[tuple[int, str, dict[str, object]]] = [
            (409, "USER_EXISTS", {"username": taken.username, "email": new_user()["email"]}),
            (409, "USER_EXISTS", {"username": new_user()["username"], "email": taken.email}),
            (400, "VALIDATION_ERROR", {"roles": ["root"]}),
            (400, "VALIDATION_ERROR", {"roles": ["user", "superuser"]}),
            (400, "VALIDATION_ERROR", {"email": "not-an-email"}),
            (400, "VALIDATION_ERROR", {"username": "no spaces"}),
            (400, "VALIDATION_ERROR", {"password": "short1"}),
        ]
        for status, code, change in cases:
            fresh = new_user()
            body = {"username": fresh["username"], "email": fresh["email"], **change}
            assert_envelope(client.post("/api/v1/users", json=body), status, code)

        # Without a password and roles: a plain user who cannot sign in until one is set.
        fresh = new_user()
        bare = client.post(
            "/api/v1/users", json={"username": fresh["username"], "email": fresh["email"]}
        )
        assert bare.status_code == 201, bare.text
        assert bare.json()["roles"] == ["user"]
        assert_envelope(_login(client, fresh["username"], ""), 401, "INVALID_CREDENTIALS")
        assert_envelope(
            _login(client, fresh["username"], "anything-123"), 401, "INVALID_CREDENTIALS"
        )

        unknown = "00000000-0000-0000-0000-000000000000"
        assert_envelope(client.get(f"/api/v1/users/{unknown}"), 404, "NOT_FOUND")
        assert_envelope(
            client.put(f"/api/v1/users/{unknown}", json={"name": "x"}), 404, "NOT_FOUND"
        )
        assert_envelope(
            client.put(f"/api/v1/users/{unknown}/roles", json={"roles": ["user"]}), 404, "NOT_FOUND"
        )


def test_admin_sets_roles(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url, headers=admin.headers) as client:
        target = _register(client)
        url = f"/api/v1/users/{target.id}/roles"
        reply = client.put(url, json={"roles": ["viewer"]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["id"] == target.id and reply.json()["roles"] == ["viewer"]
        assert client.get(f"/api/v1/users/{target.id}").json()["roles"] == ["viewer"]
        both = client.put(url, json={"roles": ["developer", "viewer", "developer"]})
        assert both.status_code == 200, both.text
        assert sorted(both.json()["roles"]) == ["developer", "viewer"]
        for bad in ([], ["root"]):
            assert_envelope(client.put(url, json={"roles": bad}), 400, "VALIDATION_ERROR")
        assert sorted(client.get(f"/api/v1/users/{target.id}").json()["roles"]) == [
            "developer",
            "viewer",
        ]


def test_unversioned_users_paths_are_deprecated_aliases(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url, headers=admin.headers) as client:
        old = client.get("/api/users", params={"limit": 5})
        new = client.get("/api/v1/users", params={"limit": 5})
        assert old.status_code == new.status_code == 200, old.text
        assert old.json()["users"] == new.json()["users"]
        assert old.headers["x-api-deprecation-date"]
        assert "/api/v1/users" in old.headers["x-api-deprecation-info"]
        assert "x-api-deprecation-date" not in new.headers

        fresh = new_user()
        created = client.post(
            "/api/users", json={"username": fresh["username"], "email": fresh["email"]}
        )
        assert created.status_code == 201, created.text
        assert created.headers["x-api-deprecation-date"]
        user_id = created.json()["id"]
        one = client.get(f"/api/users/{user_id}")
        assert one.status_code == 200 and one.json()["username"] == fresh["username"]
        assert one.headers["x-api-deprecation-date"]
        put = client.put(f"/api/users/{user_id}", json={"name": "Old Path"})
        assert put.status_code == 200 and put.json()["name"] == "Old Path"
        deleted = client.delete(f"/api/users/{user_id}")
        assert deleted.status_code == 204 and deleted.content == b""
        assert deleted.headers["x-api-deprecation-date"]
        assert_envelope(client.get(f"/api/users/{user_id}"), 404, "NOT_FOUND")


def test_admin_cannot_lock_itself_out(mesh: MeshProcess, admin: Account) -> None:
    with httpx.Client(base_url=mesh.url, headers=admin.headers) as client:
        me = f"/api/v1/users/{admin.id}"
        assert_envelope(client.delete(me), 409, "CONFLICT")
        assert_envelope(client.put(me, json={"disabled": True}), 409, "CONFLICT")
        assert_envelope(client.put(f"{me}/roles", json={"roles": ["user"]}), 409, "CONFLICT")
        # Still there, enabled and an admin.
        still = client.get(me)
        assert still.status_code == 200, still.text
        assert still.json()["disabled"] is False and "admin" in still.json()["roles"]
        assert client.get("/api/v1/users").status_code == 200
        # Editing its own name is fine.
        named = client.put(me, json={"name": "The Admin"})
        assert named.status_code == 200 and named.json()["name"] == "The Admin"


def test_non_admin_sees_and_edits_only_itself(mesh: MeshProcess) -> None:
    with httpx.Client(base_url=mesh.url) as client:
        a = _register(client)
        b = _register(client)
        mine, theirs = f"/api/v1/users/{b.id}", f"/api/v1/users/{a.id}"

        assert_envelope(
            client.get("/api/v1/users", headers=b.headers), 403, "INSUFFICIENT_PERMISSIONS"
        )
        fresh = new_user()
        create = client.post(
            "/api/v1/users",
            json={"username": fresh["username"], "email": fresh["email"]},
            headers=b.headers,
        )
        assert_envelope(create, 403, "INSUFFICIENT_PERMISSIONS")

        own = client.get(mine, headers=b.headers)
        assert own.status_code == 200, own.text
        assert own.json()["id"] == b.id and own.json()["username"] == b.username
        renamed = client.put(mine, json={"name": "B Renamed"}, headers=b.headers)
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["name"] == "B Renamed"
        assert client.get(mine, headers=b.headers).json()["name"] == "B Renamed"
        # Roles are not a field of the update: sending them changes nothing.
        sneaky = client.put(mine, json={"name": "B", "roles": ["admin"]}, headers=b.headers)
        assert sneaky.status_code in (200, 400), sneaky.text
        assert client.get(mine, headers=b.headers).json()["roles"] == ["user"]

        # Someone else's record does not exist for B: the same answer as an unknown id.
        assert_envelope(client.get(theirs, headers=b.headers), 404, "NOT_FOUND")
        assert_envelope(
            client.put(theirs, json={"name": "Hijacked"}, headers=b.headers), 404, "NOT_FOUND"
        )
        assert_envelope(
            client.get("/api/v1/users/00000000-0000-0000-0000-000000000000", headers=b.headers),
            404,
            "NOT_FOUND",
        )

        assert_envelope(
            client.put(mine, json={"disabled": True}, headers=b.headers),
            403,
            "INSUFFICIENT_PERMISSIONS",
        )
        # Writing back one's own record as read (flag unchanged) is fine.
        echoed = client.put(mine, json={"name": "B again", "disabled": False}, headers=b.headers)
        assert echoed.status_code == 200 and echoed.json()["name"] == "B again"
        for target in (mine, theirs):
            assert_envelope(
                client.delete(target, headers=b.headers), 403, "INSUFFICIENT_PERMISSIONS"
            )
            assert_envelope(
                client.put(f"{target}/roles", json={"roles": ["admin"]}, headers=b.headers),
                403,
                "INSUFFICIENT_PERMISSIONS",
            )

        # Nothing happened to A, nor to B's roles or state.
        a_me = client.get("/api/v1/auth/me", headers=a.headers)
        assert a_me.status_code == 200 and a_me.json()["user"]["name"] == a.name
        b_me = client.get("/api/v1/auth/me", headers=b.headers).json()["user"]
        assert b_me["roles"] == ["user"] and b_me["disabled"] is False

        # Without a token at all: 401, not 404.
        assert_envelope(client.get(mine), 401, "AUTH_REQUIRED")


def test_a_role_change_ends_the_access_tokens_and_the_next_refresh_carries_it(
    mesh: MeshProcess, admin: Account
) -> None:
    task = {"type": "echo", "description": "x"}
    with httpx.Client(base_url=mesh.url) as client:
        x, bystander = _register(client), _register(client)
        assert _claims(x.token)["roles"] == ["user"]
        assert client.post("/api/v1/tasks", json=task, headers=x.headers).status_code == 201
        changed = client.put(
            f"/api/v1/users/{x.id}/roles", json={"roles": ["viewer"]}, headers=admin.headers
        )
        assert changed.status_code == 200, changed.text

        # The access token signed with the old roles is refused at once, in every service: a
        # demoted account does not keep its write access for the rest of the token's hour.
        for reply in (
            client.post("/api/v1/tasks", json=task, headers=x.headers),
            client.get("/api/v1/tasks", headers=x.headers),
            client.get("/api/v1/auth/me", headers=x.headers),
        ):
            error = assert_envelope(reply, 401, "AUTH_REQUIRED")
            assert error["message"] == TOKEN_ENDED, error
        # Nobody else's.
        assert client.get("/api/v1/tasks", headers=bystander.headers).status_code == 200

        # The session goes on at its next refresh, which carries the new roles.
        refreshed = client.post("/api/v1/auth/refresh", json={"refresh_token": x.refresh_token})
        assert refreshed.status_code == 200, refreshed.text
        claims = _claims(refreshed.json()["access_token"])
        assert claims["roles"] == ["viewer"]
        assert claims["sub"] == x.id
        assert claims["permissions"] == ["read"]
        assert refreshed.json()["user"]["roles"] == ["viewer"]
        new_headers = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
        assert_envelope(
            client.post("/api/v1/tasks", json=task, headers=new_headers),
            403,
            "INSUFFICIENT_PERMISSIONS",
        )
        assert client.get("/api/v1/tasks", headers=new_headers).json()["total"] == 1

        # Setting the roles the account already has changes nothing: its token goes on.
        same = client.put(
            f"/api/v1/users/{x.id}/roles", json={"roles": ["viewer"]}, headers=admin.headers
        )
        assert same.status_code == 200, same.text
        assert client.get("/api/v1/tasks", headers=new_headers).status_code == 200


def test_disabled_user_cannot_refresh_or_sign_in(any_mesh: MeshProcess, any_admin: Account) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        x = _register(client)
        url = f"/api/v1/users/{x.id}"
        off = client.put(url, json={"disabled": True}, headers=any_admin.headers)
        assert off.status_code == 200, off.text
        assert off.json()["disabled"] is True
        assert client.get(url, headers=any_admin.headers).json()["disabled"] is True

        refresh = client.post("/api/v1/auth/refresh", json={"refresh_token": x.refresh_token})
        assert_envelope(refresh, 401, "AUTH_REQUIRED")
        assert_envelope(_login(client, x.username, x.password), 401, "INVALID_CREDENTIALS")
        assert_envelope(client.get("/api/v1/auth/me", headers=x.headers), 401, "AUTH_REQUIRED")

        on = client.put(url, json={"disabled": False}, headers=any_admin.headers)
        assert on.status_code == 200, on.text
        assert on.json()["disabled"] is False
        # Sessions from before the disabling stay ended; signing in works again.
        old = client.post("/api/v1/auth/refresh", json={"refresh_token": x.refresh_token})
        assert_envelope(old, 401, "AUTH_REQUIRED")
        login = _login(client, x.username, x.password)
        assert login.status_code == 200, login.text
        token = login.json()["access_token"]
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["user"]["id"] == x.id
        again = client.post(
            "/api/v1/auth/refresh", json={"refresh_token": login.json()["refresh_token"]}
        )
        assert again.status_code == 200, again.text


# A read of each service that any signed-in user may make.
EVERY_SERVICE = ("/api/v1/tasks", "/api/v1/stats", "/api/v1/events", "/api/v1/auth/me")


def test_disabling_or_deleting_an_account_ends_its_access_tokens_in_every_service(
    any_mesh: MeshProcess, any_admin: Account
) -> None:
    with httpx.Client(base_url=any_mesh.url) as client:
        x, y, bystander = _register(client), _register(client), _register(client)
        for account in (x, y, bystander):
            for path in EVERY_SERVICE:
                assert client.get(path, headers=account.headers).status_code == 200, path
        task = {"type": "echo", "description": "before"}
        assert client.post("/api/v1/tasks", json=task, headers=x.headers).status_code == 201

        off = client.put(
            f"/api/v1/users/{x.id}", json={"disabled": True}, headers=any_admin.headers
        )
        assert off.status_code == 200, off.text
        gone = client.delete(f"/api/v1/users/{y.id}", headers=any_admin.headers)
        assert gone.status_code in (200, 204), gone.text
        # At once, through Envoy, which still finds the tokens well signed: the services refuse
        # them. A bystander's token is untouched.
        for account in (x, y):
            for path in EVERY_SERVICE:
                assert_envelope(client.get(path, headers=account.headers), 401, "AUTH_REQUIRED")
            reply = client.post("/api/v1/tasks", json=task, headers=account.headers)
            assert_envelope(reply, 401, "AUTH_REQUIRED")
        for path in EVERY_SERVICE:
            assert client.get(path, headers=bystander.headers).status_code == 200, path

        # Enabled again, the account signs in anew; the token from before stays refused.
        on = client.put(
            f"/api/v1/users/{x.id}", json={"disabled": False}, headers=any_admin.headers
        )
        assert on.status_code == 200, on.text
        assert_envelope(client.get("/api/v1/tasks", headers=x.headers), 401, "AUTH_REQUIRED")
        login = _login(client, x.username, x.password)
        assert login.status_code == 200, login.text
        fresh = {"Authorization": f"Bearer {login.json()['access_token']}"}
        mine = client.get("/api/v1/tasks", headers=fresh)
        assert mine.status_code == 200 and mine.json()["total"] == 1, mine.text


@pytest.mark.parametrize("where", ["direct", "envoy"])
def test_users_service_over_grpc(mesh: MeshProcess, admin: Account, where: str) -> None:
    address = mesh.services["auth"] if where == "direct" else mesh.url.removeprefix("http://")
    stub = users_pb2_grpc.UsersServiceStub(grpc.insecure_channel(address))
    with httpx.Client(base_url=mesh.url) as client:
        a = _register(client)
        b = _register(client)

    def as_(account: Account) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {account.token}"),)

    with pytest.raises(grpc.RpcError) as err:
        stub.GetUser(users_pb2.GetUserRequest(user_id=a.id), metadata=as_(b), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "NOT_FOUND"

    with pytest.raises(grpc.RpcError) as err:
        stub.ListUsers(users_pb2.ListUsersRequest(), metadata=as_(b), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"

    with pytest.raises(grpc.RpcError) as err:
        stub.UpdateUser(
            users_pb2.UpdateUserRequest(user_id=b.id, disabled=True), metadata=as_(b), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_reason(err.value) == "INSUFFICIENT_PERMISSIONS"

    own = stub.GetUser(users_pb2.GetUserRequest(user_id=b.id), metadata=as_(b), timeout=10)
    assert own.id == b.id and own.username == b.username

    # Oldest first: on the shared mesh, other tests' users come before these two.
    total = stub.ListUsers(users_pb2.ListUsersRequest(limit=1), metadata=as_(admin)).total
    newest = users_pb2.ListUsersRequest(limit=100, offset=max(0, total - 100))
    listed = stub.ListUsers(newest, metadata=as_(admin), timeout=10)
    assert listed.limit == 100 and listed.total >= 3
    assert {a.id, b.id} <= {u.id for u in listed.users}
    fetched = stub.GetUser(users_pb2.GetUserRequest(user_id=a.id), metadata=as_(admin), timeout=10)
    assert fetched.username == a.username

    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteUser(
            users_pb2.DeleteUserRequest(user_id=admin.id), metadata=as_(admin), timeout=10
        )
    assert error_reason(err.value) == "CONFLICT"
    stub.DeleteUser(users_pb2.DeleteUserRequest(user_id=a.id), metadata=as_(admin), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetUser(users_pb2.GetUserRequest(user_id=a.id), metadata=as_(admin), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "NOT_FOUND"

    # No token at all: unauthenticated.
    with pytest.raises(grpc.RpcError) as err:
        stub.GetUser(users_pb2.GetUserRequest(user_id=b.id), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
