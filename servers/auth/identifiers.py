"""The forms usernames and e-mail addresses are stored, compared and found in.

One account, one name: two spellings a reader cannot tell apart must not make two accounts, nor
two budgets of login attempts. Addresses are therefore kept in Unicode's compatibility form,
case-folded (``canonical``): "b\\u00f6b" (precomposed) and "bo\\u0308b" (o + combining
diaeresis), "BOB" and "bob", "\\uff42ob" (fullwidth) and "bob" are one address. Characters that
show nothing or steer how text is shown (controls, format characters such as zero-width
spaces and bidi overrides, and private-use or unassigned code points, whose normal form a later
Unicode could change) are refused rather than folded away.

Addresses stored before this rule are brought to it by migration auth_0005, except one whose
canonical form another account already holds; ``UserStore.find_login`` still finds those as
they were stored (lower-cased).
"""

from __future__ import annotations

import hashlib
import unicodedata


def canonical(text: str) -> str:
    """NFKC, case-folded, NFKC again (case folding can undo a composition): Unicode's
    NFKC_Casefold, except that default-ignorable characters are refused, not dropped."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def trimmed(text: str) -> str:
    """``text`` without the spaces, tabs and line breaks around it (a form's stray whitespace);
    any other invisible character stays, for ``invisible`` to refuse."""
    return text.strip(" \t\r\n")


def account_key(user_id: str) -> str:
    """The per-account login limit's key of an existing account."""
    return f"user:{user_id}"


def login_key(login: str) -> str:
    """The per-account login limit's key of a login that names no account: its canonical form,
    hashed (a password typed into the username field must not become a Redis key)."""
    return "login:" + hashlib.sha256(canonical(trimmed(login)).encode()).hexdigest()[:32]
