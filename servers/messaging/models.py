"""Tables owned by the messaging service."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite autoincrements only a column declared exactly INTEGER PRIMARY KEY.
SEQ = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class MessageRow(Base):
    """A message between agents (the proto's AgentMessage), kept until its TTL ends."""

    __tablename__ = "messaging_messages"
    __table_args__ = (
        # A recipient's inbox, oldest first (streams, ListInbox, the unacked cap).
        Index("ix_messaging_messages_inbox", "to_agent", "acked_at", "created_at"),
        # A requester waiting for the response to its correlation_id.
        Index("ix_messaging_messages_correlation", "to_agent", "correlation_id"),
        Index("ix_messaging_messages_sent", "from_agent", "correlation_id"),
        Index("ix_messaging_messages_expiry", "expires_at"),
    )

    # Insertion order: ties in created_at are broken by it, so "oldest first" is stable.
    seq: Mapped[int] = mapped_column(SEQ, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(128), unique=True)
    from_agent: Mapped[str] = mapped_column(String(64))
    # The users who own the sending and the receiving agent.
    from_owner: Mapped[str] = mapped_column(String(36))
    to_agent: Mapped[str] = mapped_column(String(64))
    to_owner: Mapped[str] = mapped_column(String(36))
    type: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    correlation_id: Mapped[str] = mapped_column(String(128), default="")
    ttl_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A request whose sender waits in SendRequest until then: its response goes to the waiter,
    # not to the sender's inbox stream.
    awaited_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
