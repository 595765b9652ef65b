"""The process's monitoring figures: Prometheus metrics and the host's resources.

`Metrics` holds a registry of its own rather than prometheus_client's global one, so that two
meshes in one process (as tests start them) keep their counts apart. The servers' interceptor
counts every call it sees (``observe``); the services set what they own (tasks by status, agents,
lease expiries) before each scrape. docs/metrics.md lists the names.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# The classic text format, which every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Call durations, in seconds: from a cached read (~1 ms) to the longest unary deadline (65 s).
# Streams are counted in the same histogram when they end; their method names tell them apart.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 65.0)


class Metrics:
    def __init__(self) -> None:
        # Each counter and histogram would also export a `_created` gauge per label set: noise
        # for a scraper, and a process-wide switch of prometheus_client.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        calls = ("grpc_service", "grpc_method")
        self._handled = Counter(
            "agentmesh_grpc_server_handled",
            "Calls finished, by RPC and gRPC status code.",
            (*calls, "grpc_code"),
            registry=self.registry,
        )
        self._handling = Histogram(
            "agentmesh_grpc_server_handling_seconds",
            "How long calls took, by RPC (streams: until they ended).",
            calls,
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.tasks = Gauge(
            "agentmesh_tasks", "Tasks by status, mesh-wide.", ("status",), registry=self.registry
        )
        self.agents = Gauge(
            "agentmesh_agents",
            'Agents, mesh-wide: state="registered" (all) and state="online".',
            ("state",),
            registry=self.registry,
        )
        self.leases_expired = Counter(
            "agentmesh_task_leases_expired",
            'Leases that ran out here: outcome="requeued" or "failed" (the last attempt).',
            ("outcome",),
            registry=self.registry,
        )
        self.tasks_timed_out = Counter(
            "agentmesh_tasks_timed_out",
            "Tasks failed here because an attempt ran past its time limit (TASK_TIMEOUT).",
            registry=self.registry,
        )
        self.quota_refused = Counter(
            "agentmesh_quota_refused",
            'Calls refused by a request quota, by quota: a class ("general", ...) or a tier'
            ' ("tier:free", ...).',
            ("quota",),
            registry=self.registry,
        )
        # The labelled children of each (method, code), found once: every call records.
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, method: str, code: str, seconds: float) -> None:
        """Counts a finished call of ``method`` ("/package.Service/Method", always one the
        server serves: the label values stay few) that ended with ``code``."""
        children = self._children.get((method, code))
        if children is None:
            service, _, name = method.lstrip("/").partition("/")
            children = (
                self._handled.labels(service, name, code),
                self._handling.labels(service, name),
            )
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        """The text exposition of everything registered."""
        return generate_latest(self.registry)


@dataclass(frozen=True)
class HostUsage:
    cpu_percent: float
    memory_used_mib: int
    memory_total_mib: int
    disk_percent: float


# CPU ticks (1/100 s each, summed over the CPUs) that a sample must span to replace the last.
MIN_CPU_TICKS = 100


class Host:
    """The host's resources, from /proc (Linux; elsewhere CPU and memory read 0). CPU is the
    busy share of all CPUs between two samples: the previous ``usage()`` and this one (or, when
    that was less than MIN_CPU_TICKS ago, the one before)."""

    def __init__(self, data_dir: Path, proc: Path = Path("/proc")) -> None:
        self._data_dir = data_dir
        self._proc = proc
        self._last = (0, 0)  # (busy, total) jiffies at the previous sample; zero: since boot
        self._percent = 0.0  # the CPU share that sample gave

    def _cpu_times(self) -> tuple[int, int] | None:
        try:
            first = (self._proc / "stat").read_text().splitlines()[0].split()
        except (OSError, IndexError):
            return None
        # cpu user nice system idle iowait irq softirq steal (guest time is inside user).
        ticks = [int(t) for t in first[1:9]]
        idle = ticks[3] + ticks[4]
        return sum(ticks) - idle, sum(ticks)

    def _cpu_percent(self) -> float:
        now = self._cpu_times()
        if now is None:
            return 0.0
        busy, total = now[0] - self._last[0], now[1] - self._last[1]
        if total < MIN_CPU_TICKS:
            # Too soon after the previous sample (two dashboards polling together): a share
            # of a few ticks would be noise; the previous figure stands.
            return self._percent
        self._last = now
        self._percent = round(100.0 * busy / total, 1)
        return self._percent

    def _memory_mib(self) -> tuple[int, int]:
        fields: dict[str, int] = {}
        try:
            for line in (self._proc / "meminfo").read_text().splitlines():
                name, _, value = line.partition(":")
                fields[name] = int(value.split()[0])  # kB
        except (OSError, ValueError, IndexError):
            return 0, 0
        total = fields.get("MemTotal", 0)
        available = fields.get("MemAvailable", fields.get("MemFree", 0))
        return (total - available) // 1024, total // 1024

    def _disk_percent(self) -> float:
        try:
            usage = shutil.disk_usage(self._data_dir)
        except OSError:
            return 0.0
        return round(100.0 * usage.used / usage.total, 1) if usage.total else 0.0

    def usage(self) -> HostUsage:
        used, total = self._memory_mib()
        return HostUsage(
            cpu_percent=self._cpu_percent(),
            memory_used_mib=used,
            memory_total_mib=total,
            disk_percent=self._disk_percent(),
        )
