"""e-mail addresses in their canonical form (NFKC, case-folded), as servers/auth/identifiers.py
now stores and finds them

Addresses were stored lower-cased only, so "b\u00f6b@..." and "bo\u0308b@..." could be two
accounts. Each stored address is rewritten to its canonical form, oldest account first, unless
another account already holds that form: then it stays as it was, and sign-in still finds it as
typed (UserStore.find_login). No account is merged or lost. Usernames need nothing: they were
always ASCII letters, digits and ".-_", lower-cased, which is their canonical form.

Revision ID: auth_0005
Revises: auth_0004
"""

import unicodedata

import sqlalchemy as sa
from alembic import op

revision = "auth_0005"
down_revision = "auth_0004"
branch_labels = None
depends_on = None

EMAIL_MAX = 254


def _canonical(text: str) -> str:
    # A copy of identifiers.canonical as of this revision: a migration must not change with
    # the code after it.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def upgrade() -> None:
    conn = op.get_bind()
    users = sa.table(
        "auth_users",
        sa.column("id", sa.String),
        sa.column("email", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    # Lower-cased ASCII is canonical already: only addresses with other characters can change.
    if conn.dialect.name == "postgresql":
        wide = sa.func.octet_length(users.c.email) != sa.func.char_length(users.c.email)
    else:
        wide = sa.func.length(sa.cast(users.c.email, sa.LargeBinary)) != sa.func.length(
            users.c.email
        )
    rows = conn.execute(
        sa.select(users.c.id, users.c.email).where(wide).order_by(users.c.created_at, users.c.id)
    ).all()
    for user_id, email in rows:
        key = _canonical(email)
        if key == email or len(key) > EMAIL_MAX:
            continue
        held = conn.execute(
            sa.select(sa.func.count()).select_from(users).where(users.c.email == key)
        ).scalar_one()
        if not held:
            conn.execute(users.update().where(users.c.id == user_id).values(email=key))


def downgrade() -> None:
    # The forms addresses had before are not kept; canonical ones are found by the old code too
    # when typed as stored.
    pass
