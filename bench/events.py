"""Event fan-out: one publisher and 100 SSE subscribers through Envoy, on the in-process bus and
on Redis Streams, beside a raw redis.asyncio pub/sub round trip to as many subscribers as the
floor, all measured in the same run.

  memory_sse_<R>   the mesh on its embedded default, events published onto its in-process bus
                   at R events/s, delivered by EventsService.StreamEvents (SSE through Envoy)
                   to 100 subscribers
  redis_sse_<R>    the same with REDIS_URL set: the bus is a Redis stream on the machine's Redis
  pubsub1_<R>      the floor: PUBLISH on the machine's Redis at R messages/s to one
                   redis.asyncio subscriber, no mesh, no Envoy, no HTTP
  pubsub_<R>       the same to 100 redis.asyncio subscribers in one process (what one Python
                   process can parse: at 1,000/s that is 100,000 messages/s)

The mesh runs inside this process (so the publisher can reach its in-process bus); the
subscribers run in one child process (`python -m bench.events --client ...`), and Envoy in its
own. Latency runs from the publisher's clock before the publish to the subscriber's clock when
the frame is parsed (one machine, one clock). events/s is what every subscriber received per
second of publishing (the rate all of them sustained); a subscriber that lagged or lost events
shows as fewer events than were published.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import secrets
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import redis.asyncio as redis

from bench.auth_me import CaseResult, Settings, _percentile
from bench.dispatch import REPO, Goal, Report
from servers.common.config import Settings as MeshSettings
from servers.common.outbox import EVENTS_TOPIC
from servers.launcher import free_port
from servers.mesh import Mesh

NAME = "events"
BASELINE = (
    "pubsub1_<R> (raw redis.asyncio PUBLISH to one subscriber: the round-trip floor), "
    "pubsub_<R> (the same to 100 redis.asyncio subscribers in one process)"
)
SUBSCRIBERS = 100
RATES = (200, 1000)
GOAL_RATE, GOAL_P99_MS = 1000, 50.0
REDIS_URL = "redis://127.0.0.1:6379/0"
READY_TIMEOUT = 60.0
TAIL_SECONDS = 2.0  # after the last publish, for the last frames to arrive
SENT = re.compile(rb'"sent_us":\s*(\d+)')


def _now_us() -> int:
    return time.time_ns() // 1000


# --- the subscriber process ---


async def _sse_subscriber(
    client: httpx.AsyncClient, token: str, ready: asyncio.Event, sink: list[int], counts: list[int]
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with client.stream(
        "GET", "/api/v1/events/stream", params={"patterns": "bench.*"}, headers=headers
    ) as reply:
        reply.raise_for_status()
        buffer = b""
        async for chunk in reply.aiter_bytes():
            ready.set()
            buffer += chunk
            cut = buffer.rfind(b"\n\n")
            if cut < 0:
                continue
            complete, buffer = buffer[: cut + 2], buffer[cut + 2 :]
            now = _now_us()
            sent = SENT.findall(complete)
            sink.extend(now - int(s) for s in sent)
            counts[0] += len(sent)


async def _pubsub_subscriber(
    url: str, channel: str, ready: asyncio.Event, sink: list[int], counts: list[int]
) -> None:
    client = redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    ready.set()
    try:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            now = _now_us()
            for s in SENT.findall(message["data"]):
                sink.append(now - int(s))
                counts[0] += 1
    finally:
        await pubsub.aclose()
        await client.aclose()


async def _client_main(args: argparse.Namespace) -> None:
    latencies: list[int] = []
    counts = [[0] for _ in range(args.subscribers)]
    readies = [asyncio.Event() for _ in range(args.subscribers)]
    limits = httpx.Limits(max_connections=args.subscribers + 10)
    async with httpx.AsyncClient(base_url=args.target, timeout=None, limits=limits) as http:
        if args.client == "sse":
            jobs = [
                asyncio.create_task(_sse_subscriber(http, args.token, r, latencies, c))
                for r, c in zip(readies, counts, strict=True)
            ]
        else:
            jobs = [
                asyncio.create_task(_pubsub_subscriber(args.target, args.channel, r, latencies, c))
                for r, c in zip(readies, counts, strict=True)
            ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), READY_TIMEOUT)
        print("ready", flush=True)
        # The parent says when to stop by closing our stdin.
        await asyncio.to_thread(sys.stdin.read)
        for job in jobs:
            job.cancel()
        failures = [
            repr(r)
            for r in await asyncio.gather(*jobs, return_exceptions=True)
            if not isinstance(r, asyncio.CancelledError) and r is not None
        ]
    ordered = sorted(float(v) for v in latencies)
    print(
        json.dumps(
            {
                "received": [c[0] for c in counts],
                "p50_ms": (_percentile(ordered, 0.5) or 0) / 1000,
                "p99_ms": (_percentile(ordered, 0.99) or 0) / 1000,
                "failures": failures[:3],
            }
        ),
        flush=True,
    )


# --- the publishing side ---


async def _paced(rate: int, seconds: float, publish: Any) -> int:
    """Calls publish(seq) at `rate` per second for `seconds`; returns how many."""
    total = int(rate * seconds)
    start = time.monotonic()
    for seq in range(total):
        delay = start + seq / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await publish(seq)
    return total


async def _with_subscribers(
    command: list[str], rate: int, seconds: float, publish: Any
) -> tuple[int, dict[str, Any]]:
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT + 5)
        if line.strip() != b"ready":
            raise RuntimeError(f"subscribers failed: {(await proc.stderr.read())[-2000:]!r}")
        published = await _paced(rate, seconds, publish)
        await asyncio.sleep(TAIL_SECONDS)
        proc.stdin.close()
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        return published, json.loads(out)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _result(name: str, published: int, seconds: float, numbers: dict[str, Any]) -> CaseResult:
    received: list[int] = numbers["received"]
    short = sum(1 for r in received if r < published)
    return CaseResult(
        name=name,
        requests=min(received) if received else 0,
        errors=len(numbers["failures"]),
        seconds=seconds,
        p50_ms=numbers["p50_ms"],
        p99_ms=numbers["p99_ms"],
        first_error=(numbers["failures"] or [""])[0]
        or (f"{short} subscribers got fewer than {published} events" if short else ""),
    )


async def _mesh_case(bus: str, rate: int, seconds: float) -> CaseResult:
    prefix = f"bench-{secrets.token_hex(4)}:"
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-") as tmp:
        env = {
            "AGENTMESH_DATA_DIR": tmp,
            "AGENTMESH_PORT": str(free_port()),
            "AGENTMESH_LOG_LEVEL": "WARNING",
            "AGENTMESH_BUS_PREFIX": prefix,
            "AGENTMESH_STREAM_HEARTBEAT_SECONDS": "15",
            # All the subscribers are one user, past the default limit of 20 streams.
            "AGENTMESH_EVENT_STREAMS_PER_USER": str(SUBSCRIBERS),
        }
        if bus == "redis":
            env["REDIS_URL"] = REDIS_URL
        settings = MeshSettings.from_env(env)
        async with Mesh(settings) as mesh:
            url = f"http://127.0.0.1:{settings.public_port}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                user = {
                    "username": f"bench-{secrets.token_hex(4)}",
                    "email": f"bench-{secrets.token_hex(4)}@example.com",
                    "password": "bench-pass-42",
                    "full_name": "Bench",
                }
                reply = await http.post("/api/v1/auth/register", json=user)
                reply.raise_for_status()
                token, owner = reply.json()["access_token"], reply.json()["user"]["id"]
            bus_ = mesh.runtime.bus

            async def publish(seq: int) -> None:
                fields = {
                    "type": "bench.tick",
                    "subject": "bench",
                    "owner": owner,
                    "time": "2026-01-01T00:00:00+00:00",
                    "data": json.dumps({"seq": seq, "sent_us": _now_us()}),
                }
                await bus_.publish(EVENTS_TOPIC, fields, retention_ms=600_000, max_len=100_000)

            command = [sys.executable, "-m", "bench.events", "--client", "sse", "--target", url]
            command += ["--token", token, "--subscribers", str(SUBSCRIBERS)]
            published, numbers = await _with_subscribers(command, rate, seconds, publish)
        if bus == "redis":
            client = redis.from_url(REDIS_URL)
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
    return _result(f"{bus}_sse_{rate}", published, seconds, numbers)


async def _pubsub_case(rate: int, seconds: float, subscribers: int) -> CaseResult:
    channel = f"bench-{secrets.token_hex(4)}"
    client = redis.from_url(REDIS_URL)

    async def publish(seq: int) -> None:
        await client.publish(channel, json.dumps({"seq": seq, "sent_us": _now_us()}))

    command = [sys.executable, "-m", "bench.events", "--client", "pubsub", "--target", REDIS_URL]
    command += ["--channel", channel, "--subscribers", str(subscribers)]
    try:
        published, numbers = await _with_subscribers(command, rate, seconds, publish)
    finally:
        await client.aclose()
    name = f"pubsub_{rate}" if subscribers == SUBSCRIBERS else f"pubsub{subscribers}_{rate}"
    return _result(name, published, seconds, numbers)


def run(settings: Settings) -> Report:
    logging.getLogger("agentmesh").setLevel(logging.WARNING)
    seconds = settings.seconds
    cases: list[CaseResult] = []
    for rate in RATES:
        cases.append(asyncio.run(_pubsub_case(rate, seconds, 1)))
        cases.append(asyncio.run(_pubsub_case(rate, seconds, SUBSCRIBERS)))
        for bus in ("memory", "redis"):
            cases.append(asyncio.run(_mesh_case(bus, rate, seconds)))
    by_name = {c.name: c for c in cases}
    goals = []
    for bus in ("memory", "redis"):
        case = by_name[f"{bus}_sse_{GOAL_RATE}"]
        kept_up = case.requests >= int(GOAL_RATE * seconds)
        met = kept_up and case.p99_ms is not None and case.p99_ms < GOAL_P99_MS
        goals.append(
            Goal(
                text=f"{bus}: p99 under {GOAL_P99_MS:g} ms at {GOAL_RATE} events/s to "
                f"{SUBSCRIBERS} subscribers, every event delivered",
                met=met,
            )
        )
    return Report(
        name=NAME,
        title=f"1 publisher, {SUBSCRIBERS} SSE subscribers through Envoy, per bus and rate",
        baseline=BASELINE,
        cases=cases,
        ratios=tuple(
            (f"{bus}_sse_{rate}", f"pubsub_{rate}") for rate in RATES for bus in ("memory", "redis")
        ),
        notes=[
            "events/s: events every subscriber received, per second of publishing",
            "latency: publisher clock before publish to subscriber clock at parse",
        ],
        count_label="events",
        latency_label="deliver",
        goals=tuple(goals),
    )


def _client_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="the subscriber process of bench.events")
    parser.add_argument("--client", choices=("sse", "pubsub"), required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--channel", default="")
    parser.add_argument("--subscribers", type=int, default=SUBSCRIBERS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_client_main(_client_args(sys.argv[1:])))
