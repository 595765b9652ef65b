"""Calls between the services of the mesh: the internal credential, and a deadline on each.

When the called service runs in the same process (`agentmesh up` hosts all four), a call
goes straight to its servicer instead of through a loopback gRPC connection: the same
servicer method, the same deadline, and the same errors (an AioRpcError with the status,
message and ErrorInfo trailer the server's interceptors would have sent), without about
0.8 ms of gRPC on each side. What such a call skips is the called server's interceptors:
its access log line and the check of the internal credential, which a call from inside the
process needs no more than one from the servicer itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from . import context as callctx
from .auth import INTERNAL_HEADER
from .errors import AgentmeshError, InternalError, NotImplementedYet
from .peers import open_channel

Stub = TypeVar("Stub")
CALL_TIMEOUT = 5.0
PACKAGE = "agentmesh.v1"

log = logging.getLogger("agentmesh.internal")
_MESH = callctx.Principal(subject="mesh", kind="service")


class InternalChannel:
    """A lazily opened channel to another service, found through ``address()`` (its port is
    known only once that server has bound it). ``local``: the servicers of this process by
    service name (``TasksInternalService``), filled as its servers are built; a stub of one of
    them calls it in place. ``close()`` is safe to call twice."""

    def __init__(
        self,
        *,
        address: Callable[[], str],
        internal_token: str,
        local: Mapping[str, object] | None = None,
    ) -> None:
        self._address = address
        self.metadata = ((INTERNAL_HEADER, internal_token),)
        self._local = local if local is not None else {}
        self._channel: grpc.aio.Channel | None = None

    def stub(self, factory: Callable[[grpc.aio.Channel], Stub]) -> Stub:
        service = getattr(factory, "__name__", "").removesuffix("Stub")
        servicer = self._local.get(service)
        if servicer is not None:
            return cast(Stub, LocalStub(servicer, service))
        if self._channel is None:
            self._channel = open_channel(self._address())
        return factory(self._channel)

    def call_options(self, timeout: float = CALL_TIMEOUT) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout}

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


def error_details(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    """The details (ErrorInfo metadata) a mesh service sent with its error; {} when none came
    or they cannot be read."""
    for key, value in exc.trailing_metadata() or ():
        if key != "grpc-status-details-bin" or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return {}
        info = error_details_pb2.ErrorInfo()
        for detail in status.details:
            if detail.Unpack(info):
                return dict(info.metadata)
    return {}


def rpc_error(error: AgentmeshError) -> grpc.aio.AioRpcError:
    """The AioRpcError a caller receives when the servicer raises ``error``."""
    from .interceptors import status_for

    trailers = grpc.aio.Metadata(("grpc-status-details-bin", status_for(error).SerializeToString()))
    return grpc.aio.AioRpcError(error.status, grpc.aio.Metadata(), trailers, details=error.message)


class _LocalContext:
    """What a servicer may ask of its context in a call made in place."""

    def __init__(self, state: callctx.CallState, deadline: float | None) -> None:
        self._state = state
        self._deadline = deadline

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - asyncio.get_running_loop().time())

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(self._state.metadata.items())


class LocalStub:
    """A stub whose methods call ``servicer`` in place (see the module's docstring)."""

    def __init__(self, servicer: object, service: str) -> None:
        self._servicer = servicer
        self._service = service

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._servicer, name)
        full = f"/{PACKAGE}.{self._service}/{name}"

        async def call(
            request: Any,
            *,
            metadata: Any = (),
            timeout: float | None = None,
            **_: Any,
        ) -> Any:
            rid = callctx.request_id()
            state = callctx.CallState(
                method=full,
                request_id=rid,
                via_gateway=False,
                metadata={k: v for k, v in metadata or () if isinstance(v, str)},
                principal=_MESH,
            )
            token = callctx.enter_call(state)
            loop = asyncio.get_running_loop()
            deadline = None if timeout is None else loop.time() + timeout
            try:
                async with asyncio.timeout_at(deadline):
                    return await method(request, _LocalContext(state, deadline))
            except AgentmeshError as exc:
                raise rpc_error(exc) from None
            except TimeoutError:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    details="Deadline Exceeded",
                ) from None
            except NotImplementedError:
                raise rpc_error(NotImplementedYet(f"{full} is not implemented yet")) from None
            except Exception:
                log.exception("unhandled error in %s", full, extra={"rpc": full})
                unexpected = InternalError("internal error", details={"request_id": rid})
                raise rpc_error(unexpected) from None
            finally:
                callctx.leave_call(token)

        return call
