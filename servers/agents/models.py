"""Tables owned by the agents service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    pass


class AgentRow(Base):
    """An agent that connected at least once: who it is, what it said in its last Hello, and
    whether (and where) it is connected now (see domain.py for when it counts as online)."""

    __tablename__ = "agents_agents"
    __table_args__ = (
        Index("ix_agents_agents_owner_name", "owner_id", "name"),
        Index("ix_agents_agents_key", "key_id"),
        # The reaper looks for online rows that stopped being touched.
        Index("ix_agents_agents_online_seen", "online", "last_seen_at"),
    )

    agent_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    owner_id: Mapped[str] = mapped_column(String(36))
    # The API key it last connected with.
    key_id: Mapped[str] = mapped_column(String(36))
    name: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(64))
    capabilities: Mapped[list[str]] = mapped_column(JSON)
    max_capacity: Mapped[int] = mapped_column(Integer)
    # The configuration of its last Hello, as the agent sent it.
    configuration: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Keys set (or, as null, removed) by UpdateAgentConfig; they win over the Hello's.
    overrides: Mapped[dict[str, Any]] = mapped_column(JSON)
    version: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    connected_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    online: Mapped[bool] = mapped_column(Boolean)
    # The stream that holds it now: a replaced stream's end must not take its successor offline.
    session_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    # Tasks held at the last touch, for readers on a server that does not hold its stream.
    current_load: Mapped[int] = mapped_column(Integer, default=0)


class OutboxRow(OutboxMixin, Base):
    """An agent event (see servers/common/outbox.py)."""

    __tablename__ = "agents_outbox"
    __table_args__ = (Index("ix_agents_outbox_unpublished", "published_at", "id"),)
