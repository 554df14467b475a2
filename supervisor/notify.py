"""systemd's notify protocol without a dependency: datagrams to $NOTIFY_SOCKET.

`READY=1` once the first worker serves, `WATCHDOG=1` from the loop while it runs, `STOPPING=1` and
`RELOADING=1` around stops and reloads, `STATUS=...` for `systemctl status`. Outside systemd
(no NOTIFY_SOCKET) every message is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("supervisor.notify")

# Variables that belong to this process only: workers must not inherit them.
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class SystemdNotifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # Linux abstract namespace
            address = "\0" + address[1:]
        self.address = address
        self._socket: socket.socket | None = None
        if address and hasattr(socket, "AF_UNIX"):
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog_interval = _watchdog_interval(environ)

    def __call__(self, message: str) -> None:
        if self._socket is None:
            return
        try:
            self._socket.sendto(message.encode(), self.address)
        except OSError as error:
            log.debug("sd_notify %r failed: %s", message, error)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of systemd's WatchdogSec (its recommendation), if the watchdog is on for this process."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = environ.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000
