"""Rules for the short strings clients name things with, shared by the services.

A name or a label is shown to other people: in agent listings, task lists, dashboards and
logs. A character of Unicode's "other" categories there (a bidirectional override, a
zero-width space, a control such as ESC) can make one name look like another or rewrite a
terminal, so such fields refuse them. Free text (a task's description, a message's payload)
keeps any character.
"""

from __future__ import annotations

import re
import unicodedata

# A task type and an agent capability, which dispatch matches one against the other.
TYPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # fullmatch it
TYPE_RULE = "1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or a digit"


def invisible(text: str) -> bool:
    """Whether ``text`` holds a character of Unicode's "other" categories: a control (Cc), a
    format character (Cf), a surrogate (Cs), a private-use (Co) or unassigned (Cn) code point."""
    return any(unicodedata.category(c)[0] == "C" for c in text)
