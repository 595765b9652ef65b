"""Calls between the services of the mesh: the internal credential, and a deadline on each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from .auth import INTERNAL_HEADER

Stub = TypeVar("Stub")
CALL_TIMEOUT = 5.0


class InternalChannel:
    """A lazily opened channel to another service, found through ``address()`` (its port is
    known only once that server has bound it). ``close()`` is safe to call twice."""

    def __init__(self, *, address: Callable[[], str], internal_token: str) -> None:
        self._address = address
        self.metadata = ((INTERNAL_HEADER, internal_token),)
        self._channel: grpc.aio.Channel | None = None

    def stub(self, factory: Callable[[grpc.aio.Channel], Stub]) -> Stub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self._address())
        return factory(self._channel)

    def call_options(self, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout}

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
