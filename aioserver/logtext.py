"""Client-supplied text made fit for one log line.

A request path, a forwarded address or a remote service's message goes into log lines; left as
it is, a line feed in it forges a line, and an escape sequence rewrites the operator's
terminal. Logged through :func:`loggable`, it stays on its line, readable.
"""

from __future__ import annotations

# Characters of a request path logged, at most: a request line may be 8 KiB long (--max-line-size),
# and an access line (which holds the path twice as JSON) must stay within the 4 KiB that one
# write to a pipe keeps whole (logs.PIPE_BUF): longer, the lines of --workers cut into each other.
LONGEST_PATH = 1024
# '"' would end the quoted request of a text access line, and '\' escape its end: written as a
# client should have sent them (RFC 3986 allows neither raw), they route the same.
_QUOTES = str.maketrans({'"': "%22", "\\": "%5C"})


def loggable(text: str) -> str:
    """``text`` with every character that is not printable written as its Python escape.

    Not printable: controls (``\\n``, ``\\x1b``, ``\\x85``), line and paragraph separators
    (U+2028, U+2029), format characters, lone surrogates (an undecodable byte). A percent-encoded
    path, all printable ASCII, comes back unchanged, at the cost of one C-speed check.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def _escaped(character: str) -> str:
    return character.encode("unicode_escape").decode("ascii")


def logged_path(raw_path: str) -> str:
    """A request's path (still percent-encoded) as a log line shows it: printable ASCII only,
    without '"' or '\\', at most :data:`LONGEST_PATH` characters (then ``...``).

    '"' and '\\' become ``%22`` and ``%5C``; any other character that is not printable ASCII (only
    aiohttp's pure-Python parser lets one through) its Python escape. A path as clients send
    them costs a few C-speed checks.
    """
    if len(raw_path) <= LONGEST_PATH and raw_path.isascii() and raw_path.isprintable():
        if '"' not in raw_path and "\\" not in raw_path:
            return raw_path
    path = raw_path[: LONGEST_PATH + 1].translate(_QUOTES)  # no escape takes fewer characters
    if not (path.isascii() and path.isprintable()):
        path = "".join(c if c.isascii() and c.isprintable() else _escaped(c) for c in path)
    return path if len(path) <= LONGEST_PATH and len(raw_path) <= LONGEST_PATH else path[:LONGEST_PATH] + "..."
