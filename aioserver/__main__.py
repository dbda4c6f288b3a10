"""``python -m aioserver`` and the ``aioserver`` command."""

import signal


def main() -> None:
    # A SIGHUP (a reload) or SIGUSR1 while the server still imports and reads its config would
    # kill it: that is their default action. Held from here, they are delivered once the server
    # has its handlers (serve() unblocks them, with --workers the parent waits for them): a
    # reload is then done, SIGUSR1 ignored.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGUSR1})
    from .cli import run

    run()


if __name__ == "__main__":
    main()
