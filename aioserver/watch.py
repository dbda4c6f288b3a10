"""Reloads off the event loop: the reload thread, and TLS files reloaded when they change on disk.

certbot, cert-manager (a Kubernetes secret's volume) or an operator's script replace the
certificate files; every ``--ssl-watch-interval`` seconds their content is compared with what
the context in force was loaded from, and a change is loaded as SIGHUP loads it (new
handshakes get it, open connections keep theirs). Files that do not load (half written, a new
certificate beside the old key) leave the current context serving and are tried again at each
look until they load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .tls import Fingerprint, ReloadableContext, TLSError, fingerprint

logger = logging.getLogger("aioserver.watch")
T = TypeVar("T")

# What each file is, in log lines.
FILE_NAMES = {
    "ssl_certfile": "certificate",
    "ssl_keyfile": "key",
    "ssl_ca_certs": "CA certificates",
    "ssl_keyfile_password_file": "key password",
}


async def in_reload_thread(function: Callable[[], T]) -> T:
    """Run blocking reload work in a thread of its own.

    Never in asyncio's default executor, which sync work of workflows (hooks, file writes)
    can fill: a token revoked by SIGHUP must not wait behind a hostile client's requests.
    Reloads are rare enough for a thread each.
    """
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aioserver-reload")
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, function)
    finally:
        executor.shutdown(wait=False)  # the thread ends with its work; never wait for it on the loop


@dataclass
class FileWatch:
    """What a watcher remembers between looks: the content that failed to load, once or said."""

    failed_once: Fingerprint | None = None  # failed at the last look, not said yet
    reported: Fingerprint | None = None  # failed and said: not tried again until it changes

    def reload_if_changed(self, tls: ReloadableContext) -> None:
        """Reload ``tls`` if its files changed on disk since it was loaded (blocking).

        A failure is said once per content, once that content failed twice in a row: certbot
        points its live/ links to the new files one at a time, and a look between two of them
        sees a new certificate beside the old key, which the next look finds complete.
        """
        on_disk = fingerprint(tls.files)
        if on_disk == tls.fingerprint:
            if self.reported is not None:  # the error said is over
                logger.info("TLS files on disk are those in force again")
            self.failed_once = self.reported = None  # a new failure is news
            return
        if on_disk == self.reported:
            return  # the same bytes would fail the same way
        changed = ", ".join(f"{FILE_NAMES[file[0]]} {file[1]}" for file in on_disk if file not in tls.fingerprint)
        try:
            tls.reload()
        except TLSError as exc:
            if on_disk != self.failed_once:
                self.failed_once = on_disk
                logger.debug("TLS files changed on disk (%s) but do not load yet: %s", changed, exc)
                return
            self.failed_once, self.reported = None, on_disk
            logger.error(
                "TLS files changed on disk (%s) but do not load, keeping the current certificate"
                " until they change again: %s: %s",
                changed,
                exc.option,
                exc,
            )
            return
        self.failed_once = self.reported = None
        logger.info("reloaded TLS files changed on disk: %s", changed)


async def watch_tls_files(tls: ReloadableContext, interval: float) -> None:
    """Every ``interval`` seconds, reload ``tls`` if its files changed on disk; runs until cancelled."""
    watch = FileWatch()
    while True:
        await asyncio.sleep(interval)
        await in_reload_thread(lambda: watch.reload_if_changed(tls))
