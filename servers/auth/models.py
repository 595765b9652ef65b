"""Tables owned by the auth service."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Index, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from servers.common.outbox import OutboxMixin


class Base(DeclarativeBase):
    pass


class UserRow(Base):
    __tablename__ = "auth_users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    # Stored lower-cased, so uniqueness is case-insensitive on every database.
    username: Mapped[str] = mapped_column(String(32), unique=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    password_hash: Mapped[str | None] = mapped_column(String(255), nullable=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_login: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The quota tier (servers/common/quotas.py); "": the mesh's default.
    tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    # The `gen` claim of the access tokens issued now; raised when the account is disabled, so
    # that every token issued before is refused (TokenCutoffRow).
    token_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class RefreshTokenRow(Base):
    """An issued refresh token, by the SHA-256 of its secret; a family is one login's chain."""

    __tablename__ = "auth_refresh_tokens"
    __table_args__ = (
        Index("ix_auth_refresh_tokens_family", "family_id"),
        Index("ix_auth_refresh_tokens_user", "user_id"),
    )

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("auth_users.id", ondelete="CASCADE"))
    family_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class TokenCutoffRow(Base):
    """An account whose access tokens below a generation are refused in every process
    (AuthInternalService.ListTokenCutoffs): written by each change that ends them
    (servers/auth/cutoffs.py), kept for
    one access-token lifetime, after which those tokens have expired anyway. No foreign key:
    the cutoff of a deleted account outlives it."""

    __tablename__ = "auth_token_cutoffs"
    __table_args__ = (Index("ix_auth_token_cutoffs_changed_at", "changed_at"),)

    user_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    min_generation: Mapped[int] = mapped_column(Integer)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SessionCutoffRow(Base):
    """A session whose access tokens are refused in every process (their `sid` claim, the
    session's refresh-token family): written when it signs out or its refresh token is
    replayed, kept for one access-token lifetime. No foreign key, as TokenCutoffRow."""

    __tablename__ = "auth_session_cutoffs"
    __table_args__ = (Index("ix_auth_session_cutoffs_ended_at", "ended_at"),)

    session_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(36))
    ended_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiKeyRow(Base):
    """An API key, by the SHA-256 of its secret (the secret is random, so a fast hash suffices)."""

    __tablename__ = "auth_api_keys"
    __table_args__ = (Index("ix_auth_api_keys_user_id", "user_id"),)

    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("auth_users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    prefix: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class OutboxRow(OutboxMixin, Base):
    """A security event about an account (see servers/common/outbox.py): its subject and owner
    are the user it concerns."""

    __tablename__ = "auth_outbox"
    __table_args__ = (Index("ix_auth_outbox_unpublished", "published_at", "id"),)
