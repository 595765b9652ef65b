"""Thin servicers: proto in, domain call, proto out."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf import timestamp_pb2

from agentmesh.v1 import auth_pb2, auth_pb2_grpc, users_pb2_grpc
from servers.common.context import principal, set_http_status
from servers.common.errors import AuthRequired

from .domain import Accounts, IssuedTokens
from .keys import SigningKey
from .models import UserRow


def _ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def user_proto(user: UserRow) -> auth_pb2.User:
    return auth_pb2.User(
        id=user.id,
        username=user.username,
        email=user.email,
        name=user.name,
        roles=list(user.roles),
        created_at=_ts(user.created_at),
        last_login=_ts(user.last_login),
        disabled=user.disabled,
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


class AuthService(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, *, accounts: Accounts, key: SigningKey) -> None:
        self._accounts = accounts
        self._key = key

    async def Register(
        self, request: auth_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthTokens:
        issued = await self._accounts.register(
            email=request.email,
            password=request.password,
            username=request.username,
            name=request.full_name,
        )
        await set_http_status(context, 201)
        return tokens_proto(issued)

    async def Login(
        self, request: auth_pb2.LoginRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.AuthTokens:
        issued = await self._accounts.login(
            login=request.username or request.email, password=request.password
        )
        return tokens_proto(issued)

    async def GetMe(
        self, request: auth_pb2.GetMeRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.UserEnvelope:
        who = principal()
        if who is None:
            raise AuthRequired("authentication required")
        return auth_pb2.UserEnvelope(user=user_proto(await self._accounts.me(who)))

    async def GetJwks(
        self, request: auth_pb2.GetJwksRequest, context: grpc.aio.ServicerContext
    ) -> auth_pb2.GetJwksResponse:
        return auth_pb2.GetJwksResponse(
            keys=[auth_pb2.Jwk(**jwk) for jwk in self._key.jwks()["keys"]]
        )


class UsersService(users_pb2_grpc.UsersServiceServicer):
    """User administration; built in the identity issue. Every RPC answers UNIMPLEMENTED."""


class AuthInternalService(auth_pb2_grpc.AuthInternalServiceServicer):
    """API-key verification for other services; built with API keys in the identity issue."""
