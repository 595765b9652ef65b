"""Tables owned by the tasks service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    pass


class TaskRow(Base):
    __tablename__ = "tasks_tasks"
    __table_args__ = (
        Index("ix_tasks_tasks_owner_created", "owner_id", "created_at"),
        # The queue in claim order: highest priority first, oldest first within it.
        Index("ix_tasks_tasks_queue", "status", text("priority DESC"), "created_at", "task_id"),
        # One task per (owner, idempotency key); NULL keys never collide.
        Index("ux_tasks_tasks_idempotency", "owner_id", "idempotency_key", unique=True),
        Index("ix_tasks_tasks_lease", "status", "lease_expires_at"),
        # Tasks that ended since a moment, for the metrics.
        Index("ix_tasks_tasks_ended", "status", "completed_at"),
        # Ended tasks past the retention (an ended task's updated_at is its end).
        Index("ix_tasks_tasks_changed", "status", "updated_at"),
        # What each agent finished (the agents' metrics).
        Index("ix_tasks_tasks_agent", "assigned_agent", "status"),
        # A user's unfinished tasks, counted at every create.
        Index("ix_tasks_tasks_owner_status", "owner_id", "status"),
    )

    task_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36))
    type: Mapped[str] = mapped_column(String(64))
    title: Mapped[str] = mapped_column(String(200), default="")
    description: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(100), default="")
    task_metadata: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    required_capabilities: Mapped[list[str]] = mapped_column(JSON, default=list)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    assigned_agent: Mapped[str] = mapped_column(String(64), default="")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    error_code: Mapped[str] = mapped_column(String(64), default="")
    idempotency_key: Mapped[str | None] = mapped_column(String(128), nullable=True)
    # With a key: what the create asked for (domain._digest), so that the key reused for
    # another request is refused rather than answered with a task that is not that request's.
    request_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    callback_url: Mapped[str] = mapped_column(String(2048), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The current attempt's fencing token and lease end (see dispatch.py).
    attempt_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    # How long one attempt may run (0: no limit, tasks from before limits), and when the
    # current attempt was leased: the two give the moment it runs out of time.
    timeout_seconds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OutboxRow(OutboxMixin, Base):
    """A task event (see servers/common/outbox.py)."""

    __tablename__ = "tasks_outbox"
    __table_args__ = (Index("ix_tasks_outbox_unpublished", "published_at", "id"),)
