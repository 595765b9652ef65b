"""Server interceptors, outermost first: request id, tracing, access log, call metrics, error
mapping, authentication, request quotas, installed as one ChainInterceptor.

Each is a grpc.aio.ServerInterceptor that wraps the handler's behaviour in an async context
manager, so one implementation serves unary and streaming RPCs alike. They share the call's
state through a context variable (see context.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from . import context as callctx
from . import policy
from .auth import Authenticator
from .errors import DOMAIN, AgentmeshError, InternalError, NotImplementedYet, ValidationError
from .metrics import Metrics
from .observability import OBSERVED
from .protos import nul_field
from .quotas import QuotaExceeded, Quotas
from .server import MAX_MESSAGE_BYTES
from .tracing import Tracing

log = logging.getLogger("agentmesh.access")
errlog = logging.getLogger("agentmesh.errors")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
_STREAM_KINDS = ("unary_stream", "stream_stream")
_PROPAGATOR = TraceContextTextMapPropagator()


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


class Undecodable:
    """A request message that did not parse, or that holds what no field may, in place of the
    message (see ``_tolerant``)."""

    __slots__ = ("reason", "field")

    def __init__(self, reason: str, field: str = "") -> None:
        self.reason = reason
        self.field = field

    def problem(self) -> ValidationError:
        if self.field:
            return ValidationError(
                f"{self.field} {self.reason}", details={"field": self.field[:200]}
            )
        return ValidationError(f"the request could not be decoded: {self.reason}")


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``parse``, answering an Undecodable instead of raising. grpc parses a request before
    any interceptor runs, and a message it cannot parse (JSON nested past protobuf's depth
    limit, a string that is not UTF-8 in a path) would end the call as UNKNOWN with the
    parser's own words: a 500 to REST clients. The wrapped handler raises the Undecodable's
    VALIDATION_ERROR inside the interceptors' scope instead."""
    if parse is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            message = parse(data)
        except DecodeError as exc:
            text = str(exc)
            if "Depth" in text:
                return Undecodable("it nests too deep")
            if "UTF-8" in text:
                return Undecodable("a string is not valid UTF-8")
            return Undecodable("it is not a valid message")
        # A NUL in text reaches PostgreSQL as an error (a 500) and SQLite as a stored NUL; it
        # is refused here for every field of every RPC. No NUL byte, no NUL character: the
        # walk runs only for the few messages that hold a zero byte at all.
        if b"\x00" in data and isinstance(message, Message):
            field = nul_field(message)
            if field:
                return Undecodable("must not contain NUL characters", field)
        return message

    return tolerant


async def _decoded(frames: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose undecodable message raises its VALIDATION_ERROR."""
    async for frame in frames:
        if type(frame) is Undecodable:
            raise frame.problem()
        yield frame


class _ScopeInterceptor(grpc.aio.ServerInterceptor):
    """Runs every call of every kind inside ``self.scope(method, context)``.

    A method's handler is the same on every call, so its wrapped handler is made once and
    kept: grpc asks the interceptors on every call, and wrapping anew each time cost more
    than the scope itself."""

    def __init__(self) -> None:
        # By method; only methods the server has (an unknown one is never kept).
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    def scope(self, method: str, context: grpc.aio.ServicerContext) -> Any:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        known = self._wrapped.get(method)
        if known is not None:
            return known
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        made = self._wrapped[method] = self._wrap(method, handler)
        return made

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                break
        if kind.startswith("stream_"):
            request_stream = behavior

            def behavior(frames: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return request_stream(_decoded(frames), context)

        wrapped = (
            self._wrap_stream(method, behavior)
            if kind in _STREAM_KINDS
            else self._wrap_unary(method, behavior)
        )
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self.scope(method, context):
                if type(request) is Undecodable:
                    raise request.problem()
                result = behavior(request, context)
                response = await result if inspect.isawaitable(result) else result
                if response.ByteSize() > MAX_MESSAGE_BYTES:
                    # grpc would fail it with RESOURCE_EXHAUSTED, which REST clients read as
                    # 429 and retry for ever; it is a bug (an unbounded response): 500.
                    raise RuntimeError(f"a {response.ByteSize()} byte response of {method}")
                await callctx.send_headers(context)
                return response

        return unary

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            callctx.streaming.set(True)  # the call's own context: no reset needed
            async with self.scope(method, context):
                if type(request) is Undecodable:
                    raise request.problem()
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        await callctx.send_headers(context)
                        yield item
                elif inspect.isawaitable(result):
                    await result  # a handler that writes with context.write()

        return stream


class RequestIdInterceptor(_ScopeInterceptor):
    """Gives every call a request id: Envoy's x-request-id, a sane client one, or a new one.

    The id is returned as trailing metadata (gRPC callers) and Envoy puts it on every REST
    response itself.
    """

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        md = _metadata(context)
        rid = md.get("x-request-id", "")
        if not _REQUEST_ID.match(rid):
            rid = str(uuid.uuid4())
        state = callctx.CallState(
            method=method, request_id=rid, via_gateway="x-envoy-original-path" in md, metadata=md
        )
        token = callctx.enter_call(state)
        try:
            callctx.add_trailer(context, "x-request-id", rid)
            yield
        finally:
            callctx.leave_call(token)


class TracingInterceptor(_ScopeInterceptor):
    """A span per unary RPC (servers/common/tracing.py): its parent is the caller's W3C
    traceparent, if any; its status is the call's gRPC status. Streams are not traced."""

    def __init__(self, tracing: Tracing) -> None:
        super().__init__()
        self._tracer = tracing.tracer

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        call = callctx.current_call()
        if call is None or callctx.streaming.get():
            yield
            return
        service, _, name = method.lstrip("/").rpartition("/")
        token = otel_context.attach(_PROPAGATOR.extract(call.metadata))
        try:
            with self._tracer.start_as_current_span(
                f"{service}/{name}",
                kind=SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": name,
                    "agentmesh.request_id": call.request_id,
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    yield
                finally:
                    span.set_attribute("rpc.grpc.status_code", call.status.value[0])
                    if call.status != grpc.StatusCode.OK:
                        span.set_attribute("agentmesh.reason", call.reason)
                        span.set_status(Status(StatusCode.ERROR, call.status.name))
        finally:
            otel_context.detach(token)


class AccessLogInterceptor(_ScopeInterceptor):
    """One JSON log line per call: method, status, reason, duration, principal, request id."""

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            call = callctx.current_call()
            # Health probes arrive every few seconds from Envoy; they would drown the log.
            level = logging.DEBUG if method.startswith("/grpc.health.v1.") else logging.INFO
            if call is not None and log.isEnabledFor(level):
                log.log(
                    level,
                    "rpc",
                    extra={
                        "rpc": method,
                        "status": call.status.name,
                        "reason": call.reason,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                        "principal": call.principal.subject if call.principal else None,
                        "via_gateway": call.via_gateway,
                    },
                )


HEALTH_PROBES = "/grpc.health.v1.Health/"


class MetricsInterceptor(_ScopeInterceptor):
    """Counts every call, by RPC and status code, with its duration (servers/common/metrics.py).
    A call that ends cancelled (its caller left, or the server stops) counts as CANCELLED."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        started = time.perf_counter()
        code = ""
        call = callctx.current_call()
        # Envoy's health probes, every few seconds, would crowd out the calls worth seeing.
        record = (
            OBSERVED.begin(
                method,
                call.request_id,
                call.metadata.get("traceparent", ""),
                lambda: call.principal.subject if call.principal is not None else "",
            )
            if call is not None and not method.startswith(HEALTH_PROBES)
            else None
        )
        try:
            yield
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            code = code or (call.status.name if call is not None else "OK")
            self._metrics.observe(method, code, time.perf_counter() - started)
            if record is not None:
                who = call.principal if call is not None else None
                OBSERVED.end(record, code, who.subject if who is not None else "")


def status_for(error: AgentmeshError) -> status_pb2.Status:
    """The google.rpc.Status (with its ErrorInfo) that stands for an error on the wire."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.details)
    packed = any_pb2.Any()
    packed.Pack(info)
    return status_pb2.Status(code=error.status.value[0], message=error.message, details=[packed])


async def abort_with(context: grpc.aio.ServicerContext, error: AgentmeshError) -> None:
    """Ends the call with the error's status, ErrorInfo and the call's other trailers."""
    call = callctx.current_call()
    if call is not None:
        call.status, call.reason = error.status, error.reason
    trailers = list(call.trailers) if call else []
    if call is not None and not call.headers_sent:
        # Headers not sent yet go with the status (a trailers-only answer, which Envoy turns
        # into the response's headers).
        trailers += call.headers
    trailers.append(("grpc-status-details-bin", status_for(error).SerializeToString()))
    await context.abort(error.status, error.message, trailing_metadata=tuple(trailers))


class ErrorInterceptor(_ScopeInterceptor):
    """Turns AgentmeshError into its status; anything unexpected into a generic INTERNAL."""

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        try:
            yield
        except AgentmeshError as exc:
            await abort_with(context, exc)
        except NotImplementedError:
            # The generated base servicer raises this for RPCs no service implements yet.
            await abort_with(
                context,
                NotImplementedYet(f"{method} is not implemented yet", details={"rpc": method}),
            )
        except (grpc.aio.AbortError, GeneratorExit):
            raise
        except Exception:
            rid = callctx.request_id()
            errlog.exception("unhandled error in %s", method, extra={"rpc": method})
            await abort_with(
                context,
                InternalError("internal error", details={"request_id": rid}),
            )


class AuthInterceptor(_ScopeInterceptor):
    """Authenticates and authorises every call by the policy table, again behind Envoy."""

    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self._auth = authenticator

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        call = callctx.current_call()
        metadata = call.metadata if call is not None else _metadata(context)
        who = await self._auth.authorize(method, metadata)
        if call is not None:
            call.principal = who
        yield


class QuotaInterceptor(_ScopeInterceptor):
    """Counts every signed-in call against its principal's quota (quotas.py), after
    authentication, and sets the rate-limit headers of the answer; once the call has ended,
    counts what it cost beyond itself (callctx.add_cost)."""

    def __init__(self, quotas: Quotas, metrics: Metrics | None = None) -> None:
        super().__init__()
        self._quotas = quotas
        self._metrics = metrics

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        call = callctx.current_call()
        who = call.principal if call is not None else None
        quota = policy.rule_for(method).quota
        if call is not None and who is not None and quota:
            refused: QuotaExceeded | None = None
            try:
                pairs = await self._quotas.charge(quota, who)
            except QuotaExceeded as exc:
                pairs, refused = exc.headers, exc
            # REST: headers, which Envoy takes only from initial metadata (or from the trailers
            # of an error). gRPC callers read them from the trailers, which go out with the
            # status: initial metadata of their own would cost one more operation per call.
            if call.via_gateway:
                call.headers += pairs
            else:
                callctx.add_trailers(context, pairs)
            if refused is not None:
                if self._metrics is not None:
                    self._metrics.quota_refused.labels(refused.quota).inc()
                raise refused
            try:
                yield
            finally:
                if call.cost:
                    await self._quotas.spend(quota, who, call.cost)
            return
        yield


class ChainInterceptor(_ScopeInterceptor):
    """Several interceptors' scopes, outermost first, around one wrapper of the handler.

    Behaves as the interceptors installed one inside the other, but a streamed message passes
    through one wrapping generator instead of one per interceptor: with a hundred event
    streams, that per-message cost is a large part of the fan-out."""

    def __init__(self, links: Sequence[_ScopeInterceptor]) -> None:
        super().__init__()
        self._links = tuple(links)

    @contextlib.asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for link in self._links:
                await stack.enter_async_context(link.scope(method, context))
            yield


def default_interceptors(
    authenticator: Authenticator,
    metrics: Metrics | None = None,
    quotas: Quotas | None = None,
    tracing: Tracing | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The chain every server runs, outermost first; ``metrics``: count the calls there;
    ``quotas``: hold signed-in callers to them; ``tracing``: a span per unary call."""
    counting = [MetricsInterceptor(metrics)] if metrics is not None else []
    limiting = [QuotaInterceptor(quotas, metrics)] if quotas is not None else []
    tracing_ = [TracingInterceptor(tracing)] if tracing is not None else []
    return [
        ChainInterceptor(
            [
                RequestIdInterceptor(),
                *tracing_,
                AccessLogInterceptor(),
                *counting,
                ErrorInterceptor(),
                AuthInterceptor(authenticator),
                *limiting,
            ]
        )
    ]
