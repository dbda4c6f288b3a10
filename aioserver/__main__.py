"""``python -m aioserver`` and the ``aioserver`` command."""

import signal


def main() -> None:
    # A SIGHUP (a reload) while the server still imports and reads its config would kill it:
    # that is the default action. Held from here, it is delivered once the server can reload
    # (serve() unblocks it, with --workers the parent waits for it), and then it reloads.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    from .cli import run

    run()


if __name__ == "__main__":
    main()
