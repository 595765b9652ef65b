"""The transactional outbox: a service writes each event in the transaction of the change it
tells of, and its relay publishes the committed events to the bus, in commit order.

Each service owns its own outbox table (``<service>_outbox``), declared with ``OutboxMixin``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, String
from sqlalchemy.orm import Mapped, mapped_column


class OutboxMixin:
    """The columns of an outbox table. The subclass names the table and its index on
    (published_at, id), which the relay scans."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_type: Mapped[str] = mapped_column(String(64))
    # The task, agent or user the event is about.
    subject_id: Mapped[str] = mapped_column(String(36))
    # The user who may see it (besides admins).
    owner_id: Mapped[str] = mapped_column(String(36))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
