"""``ragline serve --workers N``: uvicorn's multi-process supervisor, with SIGHUP as a hot reload.

uvicorn's master answers SIGHUP by replacing every worker process (a restart: each new worker loads
the model again).  Here the master forwards SIGHUP to each worker that is serving instead, and each
worker reloads itself in place (:mod:`ragline.server.reload`): in-flight requests finish, no model is
reloaded unless its settings changed.  A worker still starting reads the configuration as it starts.
Every other signal behaves as in uvicorn.
"""

from __future__ import annotations

import logging
import os
import signal

from uvicorn import Config
from uvicorn.supervisors import Multiprocess

__all__ = ["ReloadingMultiprocess", "serve_workers"]

log = logging.getLogger("uvicorn.error")


class ReloadingMultiprocess(Multiprocess):
    """The master process: SIGHUP is forwarded to the workers, not a restart of them."""

    def handle_hup(self) -> None:
        sent = []
        for process in self.processes:
            pid = process.pid
            if pid is not None and process.is_ready(timeout=1):
                os.kill(pid, signal.SIGHUP)
                sent.append(pid)
        log.info("Received SIGHUP: hot reload forwarded to workers %s", sent)


def serve_workers(config: Config) -> None:
    """Bind the socket and run ``config.workers`` workers under :class:`ReloadingMultiprocess`."""
    os.environ["RAGLINE_SUPERVISOR_PID"] = str(os.getpid())  # inherited: POST /v1/admin/reload signals it
    sock = config.bind_socket()
    try:
        ReloadingMultiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
