"""Stopping a child process the way liveloop's commands do: a signal it handles, then SIGKILL after a grace."""

from __future__ import annotations

import logging
import signal
import subprocess

log = logging.getLogger(__name__)


def stop_process(process: subprocess.Popen, name: str, *, sig: signal.Signals, timeout_s: float) -> None:
    """Send ``sig`` to a running ``process`` and wait up to ``timeout_s``; kill it if it has not exited by then."""
    if process.poll() is not None:
        return
    log.info("stopping the %s", name)
    process.send_signal(sig)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("the %s did not stop within %.0f s; killing it", name, timeout_s)
        process.kill()
        process.wait()
    log.info("%s stopped", name)
