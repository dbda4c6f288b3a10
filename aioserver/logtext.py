"""Client-supplied text made fit for one log line.

A request path, a forwarded address or a remote service's message goes into log lines; left as
it is, a line feed in it forges a line, and an escape sequence rewrites the operator's
terminal. Logged through :func:`loggable`, it stays on its line, readable.
"""

from __future__ import annotations


def loggable(text: str) -> str:
    """``text`` with every character that is not printable written as its Python escape.

    Not printable: controls (``\\n``, ``\\x1b``, ``\\x85``), line and paragraph separators
    (U+2028, U+2029), format characters, lone surrogates (an undecodable byte). A percent-encoded
    path, all printable ASCII, comes back unchanged, at the cost of one C-speed check.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
