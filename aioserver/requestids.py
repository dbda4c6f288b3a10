"""Request ids: each request's, from its ``X-Request-ID`` when fit, else a new one.

The id goes back to the client in the answer's ``X-Request-ID``, and into the access line and
the error lines of the request (a 500's error id is the request id): what a client, a proxy
in front (nginx's ``$request_id``) or a tracing system reports can be found in the log. A
client's own id is taken only when it is 1-128 characters of ``A-Z a-z 0-9 . _ -``: nothing
that could forge or break a log line, or pass for a header.

A new id is 16 hex digits from a random generator of this process (seeded from the system's
randomness, again in each forked worker): an id, not a secret, so it costs a fraction of a
microsecond, not a system call. They are made a thousand at a time (one call for their bytes,
one for their digits): formatting each number alone cost five times as much as taking the next.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator

from aiohttp import web
from multidict import istr

HEADER = "X-Request-ID"
# The header's name as multidict keys it: looked up without folding its case each time.
HEADER_KEY = istr(HEADER)
# Where the id is kept on the request: a string key, so that any extension can read it
# without importing aioserver (SPEC section 8).
REQUEST_ID = "aioserver.request_id"

_FIT = re.compile(r"[A-Za-z0-9._-]{1,128}", re.ASCII)
_IN_HEAD = re.compile(rb"\nX-Request-ID:[ \t]*([A-Za-z0-9._-]{1,128})[ \t]*\r?\n", re.IGNORECASE)
_random = random.Random()
_BATCH = 1024  # ids made at once
_made: Iterator[str] = iter(())


def new_id() -> str:
    """A new request id: 16 hex digits."""
    made = next(_made, None)
    return made if made is not None else _make()


def _make() -> str:
    """The first of a new batch of ids; the rest are left for the next calls."""
    global _made
    digits = _random.randbytes(8 * _BATCH).hex()
    _made = iter([digits[i : i + 16] for i in range(16, len(digits), 16)])
    return digits[:16]


def _forked() -> None:
    """In a new worker: a generator of its own, and none of its parent's ids left to hand out."""
    global _made
    _random.seed()
    _made = iter(())


os.register_at_fork(after_in_child=_forked)  # a worker's ids are not its siblings'


def assign(request: web.BaseRequest) -> str:
    """The request's id (the client's when fit, else a new one), kept on the request."""
    given = request.headers.get(HEADER_KEY)
    rid = given if given is not None and _FIT.fullmatch(given) else new_id()
    request[REQUEST_ID] = rid
    return rid


def id_in_head(head: bytes) -> str:
    """The id of a request read as raw bytes (one refused at the connection limit): its
    ``X-Request-ID`` when fit, else a new one."""
    given = _IN_HEAD.search(head)
    return given.group(1).decode("ascii") if given else new_id()


def known_string_keys(*keys: str) -> None:
    """Tell aiohttp that these string keys of the request's storage are meant.

    aiohttp warns (once per key) that a string key could collide: ours are namespaced, and
    shared by name (SPEC section 8). Without this, the warning would reach the log once.
    """
    seen = getattr(web.BaseRequest, "_seen_str_keys", None)
    if isinstance(seen, set):
        seen.update(keys)


known_string_keys(REQUEST_ID)
