"""Background jobs of a process: stopping them without hanging on one that will not stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Iterable
from typing import Any

log = logging.getLogger("agentmesh.jobs")

RECANCEL_SECONDS = 0.5


def _names(jobs: Iterable[asyncio.Future[Any]]) -> list[str]:
    coros = (getattr(job, "get_coro", lambda: None)() for job in jobs)
    return sorted(getattr(coro, "__qualname__", "?") for coro in coros)


async def stop_jobs(jobs: Collection[asyncio.Future[Any]], *, patience: float) -> None:
    """Cancels background jobs and waits for them to end, for ``patience`` seconds at most.

    A job still running half a second after its cancellation is cancelled again: a loop whose
    cancellation was swallowed below it (seen with the Redis bus's consumers on PostgreSQL,
    where stopping hung until the process was killed) then stops at its next await. What still
    runs after ``patience`` is left behind with a warning: a shutdown never hangs on it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(patience, RECANCEL_SECONDS)
    pending = {job for job in jobs if not job.done()}
    for job in pending:
        job.cancel()
    while pending and (left := deadline - loop.time()) > 0:
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_SECONDS, left))
        if pending:
            log.warning("jobs outlived their cancellation, cancelled again: %s", _names(pending))
            for job in pending:
                job.cancel()
    for job in jobs:
        if job.done() and not job.cancelled():
            job.exception()  # retrieved: a job that failed has logged it itself
    if pending:
        log.warning("jobs still running after %.1f s, left behind: %s", patience, _names(pending))
