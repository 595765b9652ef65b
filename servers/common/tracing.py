"""OpenTelemetry traces (DESIGN.md, Operations): a span for every unary RPC, joined to the
caller's W3C `traceparent`, with a child span for every database statement and Redis command it
makes; exported over OTLP/HTTP.

Tracing is on when the standard OTLP variables name a collector (OTEL_EXPORTER_OTLP_ENDPOINT or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT); the SDK reads the rest of its settings (OTEL_TRACES_SAMPLER,
OTEL_BSP_*, OTEL_EXPORTER_OTLP_HEADERS, ...) from the environment itself. Off, nothing of it
runs: no interceptor, no statement hooks.

What is not traced, and why:
- Streams (the agent stream, event and inbox streams): one span would live for hours, and every
  task the stream carries would land in its trace.
- Statements outside an RPC span (background jobs, work an agent's stream triggers): they would
  each be a trace of one span.
- In-place calls between the services of one process (servers/common/internal.py): their
  statements belong to the calling RPC's span.
- Redis commands outside an RPC span: the bus's followers block on Redis all the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from .observability import OBSERVED

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

log = logging.getLogger("agentmesh.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
CLOSE_SECONDS = 2.0  # how long a stopping process waits for its last spans to be exported
STATEMENT_CHARS = 2000  # db.query.text is cut to this
_SPAN_KEY = "_agentmesh_span"


# Redis commands are run by modules that know nothing of Tracing: their spans come from the
# process's global provider, which Tracing sets (a no-op one until then).
_REDIS = trace.get_tracer("agentmesh.redis")


@contextlib.contextmanager
def redis_span(command: str) -> Iterator[None]:
    """A client span around a Redis command, under a traced RPC only (always counted for
    the observability endpoints)."""
    OBSERVED.external += 1
    if not trace.get_current_span().is_recording():
        yield
        return
    with _REDIS.start_as_current_span(
        f"{command} redis",
        kind=SpanKind.CLIENT,
        attributes={"db.system.name": "redis", "db.operation.name": command},
    ):
        yield


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment names an OTLP collector."""
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


class Tracing:
    """The process's tracer provider, exporting to the configured collector in batches."""

    def __init__(self, *, version: str) -> None:
        # The SDK and its exporter (with requests) load only when tracing is on: the settings
        # import this module, and every CLI command with them.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "agentmesh", "service.version": version})
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("agentmesh")
        trace.set_tracer_provider(self.provider)  # for redis_span; once per process

    def instrument(self, engine: Engine) -> None:
        """A child span for every statement the engine runs inside a traced RPC."""
        from sqlalchemy import event

        system = engine.dialect.name
        tracer = self.tracer

        def before(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            if context is None or not trace.get_current_span().is_recording():
                return
            operation = statement.lstrip()[:16].split(None, 1)[0].upper()
            span = tracer.start_span(
                f"{operation} {system}",
                kind=SpanKind.CLIENT,
                attributes={
                    "db.system.name": system,
                    "db.operation.name": operation,
                    "db.query.text": statement[:STATEMENT_CHARS],
                },
            )
            setattr(context, _SPAN_KEY, span)

        def after(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
        ) -> None:
            span = getattr(context, _SPAN_KEY, None) if context is not None else None
            if span is not None:
                span.end()

        def failed(exception_context: Any) -> None:
            context = exception_context.execution_context
            span = getattr(context, _SPAN_KEY, None) if context is not None else None
            if span is not None:
                error = type(exception_context.original_exception).__name__
                span.set_status(Status(StatusCode.ERROR, error))
                span.end()

        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        event.listen(engine, "handle_error", failed)

    async def close(self, *, patience: float = CLOSE_SECONDS) -> None:
        """Exports what the batch still holds, for ``patience`` seconds at most. The SDK's
        shutdown blocks, retrying an unreachable collector for tens of seconds: it runs on a
        daemon thread, which a stopping process leaves behind."""
        done = threading.Event()

        def shutdown() -> None:
            try:
                self.provider.shutdown()
            finally:
                done.set()

        threading.Thread(target=shutdown, name="otel-shutdown", daemon=True).start()
        deadline = time.monotonic() + patience
        while not done.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not done.is_set():
            log.warning("spans not exported in %.1f s at shutdown, left behind", patience)
