"""Per-call state, set by the interceptors and read anywhere below them."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True, kw_only=True)
class Principal:
    """Who is calling: a user signed in with a token, an API key, or a mesh service."""

    subject: str
    kind: str  # "user" | "api_key" | "service"
    username: str = ""
    roles: tuple[str, ...] = ()
    permissions: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    token_id: str = ""
    tier: str = ""  # the account's quota tier; "": the mesh's default (quotas.py)


@dataclass
class CallState:
    """Mutable state of one RPC, shared by the interceptors of that call."""

    method: str
    request_id: str
    via_gateway: bool
    # The call's text metadata, parsed once by the outermost interceptor.
    metadata: dict[str, str] = field(default_factory=dict)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    principal: Principal | None = None
    status: grpc.StatusCode = grpc.StatusCode.OK
    reason: str = ""
    # Response headers (initial metadata) to send with the response: with the first message,
    # or as trailers when the call fails before one (send_headers, interceptors.abort_with).
    headers: list[tuple[str, str]] = field(default_factory=list)
    headers_sent: bool = False
    # What the call cost beyond itself, in calls of its quota, counted once it ends (add_cost).
    cost: int = 0


_call: contextvars.ContextVar[CallState | None] = contextvars.ContextVar("call", default=None)
# Set by the interceptors' wrapper of a streaming RPC, before any interceptor's scope.
streaming: contextvars.ContextVar[bool] = contextvars.ContextVar("streaming", default=False)


def current_call() -> CallState | None:
    """The state of the RPC being served, or None outside of one."""
    return _call.get()


def enter_call(state: CallState) -> contextvars.Token[CallState | None]:
    return _call.set(state)


def leave_call(token: contextvars.Token[CallState | None]) -> None:
    try:
        _call.reset(token)
    except ValueError:
        # A server stream cancelled while paused at a yield is closed from another context,
        # where the token does not belong; there is nothing of this call to undo there.
        _call.set(None)


def principal() -> Principal | None:
    """The authenticated caller of the current RPC, if any."""
    call = _call.get()
    return call.principal if call else None


def require_principal() -> Principal:
    """The caller of an RPC whose policy rule demands one. The authenticating interceptor has
    already refused anonymous calls; this guards against a wrong rule in the policy table."""
    from .errors import AuthRequired

    who = principal()
    if who is None:
        raise AuthRequired("authentication required")
    return who


def add_cost(calls: int) -> None:
    """Counts the current call as ``calls`` more against its caller's quota: for a call whose
    work grows with something the caller does not own (a scan of every retained event)."""
    call = _call.get()
    if call is not None and calls > 0:
        call.cost += calls


def request_id() -> str:
    call = _call.get()
    return call.request_id if call else ""


def add_trailer(context: grpc.aio.ServicerContext, key: str, value: str) -> None:
    """Adds trailing metadata without dropping what other layers set before."""
    add_trailers(context, ((key, value),))


def add_trailers(context: grpc.aio.ServicerContext, pairs: Sequence[tuple[str, str]]) -> None:
    """Adds (or replaces) trailing metadata keys, keeping the others."""
    call = _call.get()
    if call is None:
        context.set_trailing_metadata(tuple(pairs))
        return
    keys = {key for key, _ in pairs}
    call.trailers = [(k, v) for k, v in call.trailers if k not in keys]
    call.trailers.extend(pairs)
    context.set_trailing_metadata(tuple(call.trailers))


async def set_http_status(context: grpc.aio.ServicerContext, status: int) -> None:
    """Asks the gateway to answer a REST call with this HTTP status (e.g. 201, 503).

    The transcoder answers every successful RPC with 200, and it drops custom trailers, so this
    goes out as initial metadata, which Envoy's Lua filter turns into the status. Call it only
    right before returning the response: once initial metadata is sent, a later error could no
    longer become an HTTP error status. Only REST calls (transcoded by Envoy, which marks them
    with x-envoy-original-path) get it: a native gRPC caller would ignore the header, and
    sending initial metadata early is one more operation on the call.
    """
    call = _call.get()
    if call is None:
        await context.send_initial_metadata((("x-http-status", str(status)),))
        return
    if not call.via_gateway:
        return
    call.headers.append(("x-http-status", str(status)))
    await send_headers(context)


async def send_headers(context: grpc.aio.ServicerContext) -> None:
    """Sends the call's response headers (CallState.headers), once, if there are any: right
    before the first response message, so that an error raised earlier still ends the call
    with its own status (trailers only), which Envoy turns into the HTTP status."""
    call = _call.get()
    if call is None or call.headers_sent or not call.headers:
        return
    call.headers_sent = True
    await context.send_initial_metadata(tuple(call.headers))
