"""Logging to journald (under systemd) or plain lines on stderr.

Secrets never reach a log: they travel as SecretBytes, which prints as
`<secret: N bytes>`, and error messages are written not to include them.
"""

from __future__ import annotations

import logging
import os
import sys

from agent.events import DEVICE_FIELD


class _DeviceContext(logging.Filter):
    """Adds the gateway's device ID to every journal record once it is known."""

    device_id: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.device_id is not None and not hasattr(record, DEVICE_FIELD):
            setattr(record, DEVICE_FIELD, self.device_id)
        return True


_context = _DeviceContext()


def set_device_id(device_id: str | None) -> None:
    _context.device_id = device_id


def _stderr_is_journal() -> bool:
    """True when systemd connected our stderr to the journal (JOURNAL_STREAM=dev:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def configure(level: str, identifier: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if _stderr_is_journal():
        from systemd.journal import JournalHandler

        handler = JournalHandler(SYSLOG_IDENTIFIER=identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_context)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root.addHandler(handler)
    set_level(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


def stderr_log_file() -> str | None:
    """The regular file this process's stderr is redirected to, if any (an agent run
    outside systemd, `devid-agent ... 2>>agent.log`): the support bundle collects it."""
    try:
        target = os.readlink("/proc/self/fd/2")
        return target if os.path.isfile(target) else None
    except OSError:
        return None
