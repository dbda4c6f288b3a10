"""The ``Expect`` request header: ``100-continue`` is met, any other expectation ignored.

aiohttp meets expectations in its router, before any middleware, for every route and for
unknown paths and methods too: ``100-continue`` gets its interim ``100 Continue``, anything
else a plain-text 417 that echoes the header and carries aiohttp's name and version instead of
our headers. RFC 9110 section 10.1.1 lets a server ignore an expectation it does not know, and
aioserver does: the request factory leaves such an ``Expect`` out, so the request is
authorized, served and answered as any other. ``100-continue`` stays aiohttp's, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

CONTINUE = "100-continue"

RequestFactory = Callable[
    [RawRequestMessage, StreamReader, RequestHandler, AbstractStreamWriter, "asyncio.Task[None]"], web.BaseRequest
]


def ignoring_unknown_expectations(factory: RequestFactory) -> RequestFactory:
    """``factory`` (a web.Server's request factory), with unknown expectations left out."""

    def make_request(
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        expect = message.headers.get(hdrs.EXPECT)
        if expect is not None and expect.lower() != CONTINUE:  # aiohttp's own comparison
            message = _only_continue(message)
        return factory(message, payload, protocol, writer, task)

    return make_request


def _only_continue(message: RawRequestMessage) -> RawRequestMessage:
    """The message with ``Expect: 100-continue`` if it expects that among others, else none."""
    expected = {e.strip().lower() for v in message.headers.getall(hdrs.EXPECT) for e in v.split(",")}
    headers = CIMultiDict(message.headers)
    del headers[hdrs.EXPECT]
    raw = tuple((name, value) for name, value in message.raw_headers if name.lower() != b"expect")
    if CONTINUE in expected:
        headers[hdrs.EXPECT] = CONTINUE
        raw += ((b"Expect", CONTINUE.encode()),)
    return message._replace(headers=CIMultiDictProxy(headers), raw_headers=raw)
