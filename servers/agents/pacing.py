"""What the frames of one Connect stream may cost the tasks service.

A REST call counts against its caller's quota; a Connect stream is one call, however many
frames it carries. Each progress frame is a write transaction and a `task.progress` event on
the bus (whose retention is shared by every user), each heartbeat a lease renewal: an agent
sending them as fast as it can would hold the writer and push other users' events out of
the retained window. The reference agent sends at most 5 progress frames a second per task and
a heartbeat per interval; a stream is held to that, and what comes faster is paced, not
refused:

- progress: a token bucket of ``PROGRESS_PER_SLOT`` frames a second per slot of the agent's
  capacity (at most ``PROGRESS_MAX_RATE``), bursts of twice that. A frame over the budget waits
  as its task's latest word (a later frame of the same task replaces it) and is forwarded when
  the budget allows, at the next frame or heartbeat; one of a task whose outcome came is
  dropped.
- heartbeats: at most one lease renewal per half heartbeat interval; the others only say the
  agent is alive.
"""

from __future__ import annotations

import math
import time

from agentmesh.v1 import agents_pb2

PROGRESS_PER_SLOT = 5.0
PROGRESS_MAX_RATE = 100.0
# Tasks whose latest progress may wait at once; past it a frame of yet another task is dropped.
PENDING_MAX = 1000


class Pacer:
    def __init__(self, *, capacity: int, heartbeat_seconds: float) -> None:
        self._rate = min(PROGRESS_PER_SLOT * max(1, capacity), PROGRESS_MAX_RATE)
        self._burst = 2 * self._rate
        self._tokens = self._burst
        self._at = time.monotonic()
        self._renew_every = heartbeat_seconds / 2
        self._renewed_at = -math.inf
        self._pending: dict[str, agents_pb2.TaskProgress] = {}

    def _take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def progress(self, frame: agents_pb2.TaskProgress) -> list[agents_pb2.TaskProgress]:
        """The progress frames to forward now, this one's task's last: waiting ones first
        (oldest first), as far as the budget goes; this one waits if it does not."""
        self._pending.pop(frame.task_id, None)
        due = self.due()
        if not self._pending and self._take():
            return [*due, frame]
        if len(self._pending) < PENDING_MAX:
            self._pending[frame.task_id] = frame
        return due

    def due(self) -> list[agents_pb2.TaskProgress]:
        """Waiting frames the budget now allows, oldest first."""
        out: list[agents_pb2.TaskProgress] = []
        while self._pending and self._take():
            task_id = next(iter(self._pending))
            out.append(self._pending.pop(task_id))
        return out

    def ended(self, task_id: str) -> None:
        """The task's outcome came: its waiting progress is moot."""
        self._pending.pop(task_id, None)

    def may_renew(self) -> bool:
        """Whether this heartbeat renews the leases (and marks the time if so)."""
        now = time.monotonic()
        if now - self._renewed_at < self._renew_every:
            return False
        self._renewed_at = now
        return True
