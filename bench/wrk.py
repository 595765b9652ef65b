"""REST load from wrk (a native HTTP load generator) when it is installed.

A Python client on the same two cores tops out far below Envoy (about 300 requests/s against
about 1,800 on this machine), so REST figures measured with it describe the client more than the
mesh. wrk comes from Debian's `wrk` package; without it the benchmark falls back to the Python
client and says so.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess

from bench.auth_me import CaseResult, Settings

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def available() -> bool:
    return shutil.which("wrk") is not None


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _run(url: str, headers: dict[str, str], seconds: float, connections: int) -> str:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr.strip()[:300]}")
    return done.stdout


def _measure(name: str, out: str) -> CaseResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(s|m)", out)
    if total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    seconds = float(total.group(2)) * (60 if total.group(3) == "m" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(bad.group(1)) if bad else 0
    errors += sum(int(n) for n in socket.groups()) if socket else 0
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.MULTILINE)
    return CaseResult(
        name=name,
        requests=int(total.group(1)) - errors,
        errors=errors,
        seconds=seconds,
        p50_ms=_ms(p50.group(1)) if p50 else None,
        p99_ms=_ms(p99.group(1)) if p99 else None,
        first_error="non-2xx responses or socket errors (wrk counts, does not show them)"
        if errors
        else "",
    )


Target = tuple[str, str, dict[str, str]]  # case name, URL, request headers


async def cases(targets: list[Target], settings: Settings, rounds: int = 3) -> list[CaseResult]:
    """Runs the cases interleaved, ``rounds`` times each for a third of the time: a slow moment
    of the machine then falls on every case alike. Requests and time add up over the rounds;
    p50/p99 are the median of the rounds' values."""
    for _, url, headers in targets:
        await asyncio.to_thread(_run, url, headers, 1, settings.concurrency)
    runs: dict[str, list[CaseResult]] = {name: [] for name, _, _ in targets}
    for _ in range(rounds):
        for name, url, headers in targets:
            out = await asyncio.to_thread(
                _run, url, headers, settings.seconds / rounds, settings.concurrency
            )
            runs[name].append(_measure(name, out))
    merged = []
    for name, results in runs.items():
        p50s = sorted(r.p50_ms for r in results if r.p50_ms is not None)
        p99s = sorted(r.p99_ms for r in results if r.p99_ms is not None)
        merged.append(
            CaseResult(
                name=name,
                requests=sum(r.requests for r in results),
                errors=sum(r.errors for r in results),
                seconds=sum(r.seconds for r in results),
                p50_ms=p50s[len(p50s) // 2] if p50s else None,
                p99_ms=p99s[len(p99s) // 2] if p99s else None,
                first_error=next((r.first_error for r in results if r.first_error), ""),
            )
        )
    return merged
