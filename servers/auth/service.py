"""Thin servicers: proto in, domain call, proto out."""

from __future__ import annotations

from datetime import UTC

import grpc

from agentmesh.v1 import auth_pb2, auth_pb2_grpc, users_pb2, users_pb2_grpc
from servers.common.auth import bearer_token
from servers.common.clock import timestamp
from servers.common.context import require_principal, set_http_status
from servers.common.errors import AuthRequired, ValidationError
from servers.common.pagination import page

from .admin import UserAdmin
from .apikeys import ApiKeys
from .domain import Accounts, IssuedTokens
from .keys import SigningKey
from .models import ApiKeyRow, UserRow


def user_proto(user: UserRow) -> auth_pb2.User:
    return auth_pb2.User(
        id=user.id,
        username=user.username,
        email=user.email,
        name=user.name,
        roles=list(user.roles),
        created_at=timestamp(user.created_at),
        last_login=timestamp(user.last_login),
        disabled=user.disabled,
        tier=user.tier,
    )


def key_proto(key: ApiKeyRow) -> auth_pb2.ApiKey:
    return auth_pb2.ApiKey(
        key_id=key.key_id,
        name=key.name,
        prefix=key.prefix,
        scopes=list(key.scopes),
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        last_used_at=timestamp(key.last_used_at),
        revoked_at=timestamp(key.revoked_at),
    )


def tokens_proto(issued: IssuedTokens) -> auth_pb2.AuthTokens:
    return auth_pb2.AuthTokens(
        access_token=issued.access_token,
        refresh_token=issued.refresh_token,
        token_type="bearer",
        expires_in=issued.expires_in,
        user=user_proto(issued.user),
        token=issued.access_token,
    )


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def client_address(context: grpc.aio.ServicerContext) -> str:
    """The caller's address: the hop Envoy appended to X-Forwarded-For, else the peer.

    Envoy (use_remote_address) appends the address it saw, so only the last entry is trusted;
    whatever a client wrote before it is ignored. Direct server ports are for the mesh itself.
    """
    forwarded = _metadata(context).get("x-forwarded-for", "")
    if forwarded:
        return forwarded.rsplit(",", 1)[-1].strip()[:64]
    peer = context.peer() or ""  # "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555"
    return peer.split(":", 1)[-1].rsplit(":", 1)[0][:64]


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, *, accounts: Accounts, api_keys: ApiKeys, key: SigningKey) -> None:
        self._accounts = accounts
        self._api_keys = api_keys
        self._key = key

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthTokens:
        issued = await self._accounts.register(
            email=request.email,
            password=request.password,
            username=request.username,
            name=request.full_name,
            client=client_address(context),
        )
        await set_http_status(context, 201)
        return tokens_proto(issued)

    async def Login(
        self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthTokens:
        issued = await self._accounts.login(
            login=request.username or request.email,
            password=request.password,
            client=client_address(context),
        )
        return tokens_proto(issued)

    async def Refresh(
        self, request: auth_pb2.RefreshRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthTokens:
        token = request.refresh_token or bearer_token(_metadata(context)) or ""
        if not token:
            raise AuthRequired("a refresh token is required")
        return tokens_proto(await self._accounts.refresh(token))

    async def Logout(
        self, request: auth_pb2.LogoutRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.LogoutResponse:
        await self._accounts.logout(require_principal(), request.refresh_token)
        return auth_pb2.LogoutResponse(message="Logged out")

    async def GetMe(
        self, request: auth_pb2.GetMeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UserEnvelope:
        return auth_pb2.UserEnvelope(user=user_proto(await self._accounts.me(require_principal())))

    async def UpdateMe(
        self, request: auth_pb2.UpdateMeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UserEnvelope:
        user = await self._accounts.update_me(
            require_principal(), name=request.name, email=request.email
        )
        return auth_pb2.UserEnvelope(user=user_proto(user))

    async def ChangePassword(
        self, request: auth_pb2.ChangePasswordRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ChangePasswordResponse:
        issued = await self._accounts.change_password(
            require_principal(), current=request.current_password, new=request.new_password
        )
        return auth_pb2.ChangePasswordResponse(
            message="Password changed successfully",
            access_token=issued.access_token,
            refresh_token=issued.refresh_token,
            token_type="bearer",
            expires_in=issued.expires_in,
        )

    async def ValidateToken(
        self, request: auth_pb2.ValidateTokenRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ValidateTokenResponse:
        user = await self._accounts.me(require_principal())
        return auth_pb2.ValidateTokenResponse(valid=True, user=user_proto(user))

    async def CreateApiKey(
        self, request: auth_pb2.CreateApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.CreateApiKeyResponse:
        expires = request.expires_at.ToDatetime(UTC) if request.HasField("expires_at") else None
        row, secret = await self._api_keys.create(
            require_principal(), name=request.name, scopes=list(request.scopes), expires_at=expires
        )
        await set_http_status(context, 201)
        return auth_pb2.CreateApiKeyResponse(api_key=key_proto(row), key=secret)

    async def ListApiKeys(
        self, request: auth_pb2.ListApiKeysRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListApiKeysResponse:
        p = page(request.limit, request.offset)
        rows, total = await self._api_keys.list(require_principal(), p)
        keys, served = p.fit([key_proto(r) for r in rows])
        return auth_pb2.ListApiKeysResponse(api_keys=keys, **served.fields(total))

    async def RevokeApiKey(
        self, request: auth_pb2.RevokeApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.RevokeApiKeyResponse:
        row = await self._api_keys.revoke(require_principal(), request.key_id)
        return auth_pb2.RevokeApiKeyResponse(api_key=key_proto(row))

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(
            keys=[auth_pb2.Jwk(**jwk) for jwk in self._key.jwks()["keys"]]
        )


class UsersService(users_pb2_grpc.UsersServiceServicer):
    def __init__(self, *, admin: UserAdmin) -> None:
        self._admin = admin

    async def ListUsers(
        self, request: users_pb2.ListUsersRequest, context: grpc.aio.ServicerContext
    ) -> users_pb2.ListUsersResponse:
        p = page(request.limit, request.offset)
        rows, total = await self._admin.list(require_principal(), p)
        users, served = p.fit([user_proto(r) for r in rows])
        return users_pb2.ListUsersResponse(users=users, **served.fields(total))

    async def CreateUser(
        self, request: users_pb2.CreateUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.User:
        user = await self._admin.create(
            require_principal(),
            username=request.username,
            email=request.email,
            password=request.password,
            name=request.name,
            roles=list(request.roles),
        )
        await set_http_status(context, 201)
        return user_proto(user)

    async def GetUser(
        self, request: users_pb2.GetUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.User:
        return user_proto(await self._admin.get(require_principal(), request.user_id))

    async def UpdateUser(
        self, request: users_pb2.UpdateUserRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.User:
        user = await self._admin.update(
            require_principal(),
            request.user_id,
            username=request.username,
            email=request.email,
            name=request.name,
            disabled=request.disabled if request.HasField("disabled") else None,
        )
        return user_proto(user)

    async def DeleteUser(
        self, request: users_pb2.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> users_pb2.DeleteUserResponse:
        await self._admin.delete(require_principal(), request.user_id)
        await set_http_status(context, 204)
        return users_pb2.DeleteUserResponse()

    async def SetUserRoles(
        self, request: users_pb2.SetUserRolesRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.User:
        return user_proto(
            await self._admin.set_roles(require_principal(), request.user_id, list(request.roles))
        )

    async def SetUserTier(
        self, request: users_pb2.SetUserTierRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.User:
        return user_proto(
            await self._admin.set_tier(require_principal(), request.user_id, request.tier)
        )


class AuthInternalService(auth_pb2_grpc.AuthInternalServiceServicer):
    """What other services of the mesh ask the auth service."""

    def __init__(self, *, api_keys: ApiKeys, admin: UserAdmin) -> None:
        self._api_keys = api_keys
        self._admin = admin

    async def ListTokenCutoffs(
        self, request: auth_pb2.ListTokenCutoffsRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.ListTokenCutoffsResponse:
        cutoffs = self._admin.cutoffs
        return auth_pb2.ListTokenCutoffsResponse(
            cutoffs=[
                auth_pb2.TokenCutoff(
                    user_id=user_id, min_generation=generation, expires_at=timestamp(until)
                )
                for user_id, generation, until in await cutoffs.recent()
            ],
            sessions=[
                auth_pb2.SessionCutoff(session_id=session_id, expires_at=timestamp(until))
                for session_id, until in await cutoffs.recent_sessions()
            ],
        )

    async def VerifyApiKey(
        self, request: auth_pb2.VerifyApiKeyRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.VerifyApiKeyResponse:
        if not request.key:
            raise ValidationError("key is required", details={"field": "key"})
        user, key, _ = await self._api_keys.verify(request.key)
        return auth_pb2.VerifyApiKeyResponse(
            user=user_proto(user), key_id=key.key_id, scopes=list(key.scopes)
        )
