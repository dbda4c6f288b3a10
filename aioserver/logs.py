"""Logging: the process's handlers, and an access log that names identities, never secrets."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .auth import IDENTITY
from .proxy import REAL_CLIENT


def configure_logging(level: str) -> None:
    """One stream handler on stderr (journald adds its own timestamps under systemd)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class AccessLogger(AbstractAccessLogger):
    """``client scheme "METHOD /path HTTP/1.1" status bytes seconds identity``.

    Behind a trusted proxy, client and scheme are those the proxy reported (see proxy.py).

    The path is logged still percent-encoded and without its query: a decoded path could
    forge log lines, and a query is where a careless client puts a secret. The identity is
    the matched token's name, ``-`` when none.
    """

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        token = request.get(IDENTITY)
        client, scheme = request.get(REAL_CLIENT) or (request.remote, request.scheme)
        self.logger.info(
            '%s %s "%s %s HTTP/%d.%d" %d %d %.3fs %s',
            client,
            scheme,
            request.method,
            request.rel_url.raw_path,
            request.version.major,
            request.version.minor,
            response.status,
            response.body_length,
            time,
            token.name if token else "-",
        )
