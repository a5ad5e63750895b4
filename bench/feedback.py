"""Feedback ingestion at the API: liveloop's ``POST /v1/feedback`` against a no-op endpoint, in the same run.

    python bench/feedback.py [--database sqlite|postgresql] [--clients 64] [--requests 6400]

Both servers run in their own process under the same uvicorn (one worker, uvloop + httptools, access log off):

- ``no-op``: a FastAPI app whose ``POST /v1/feedback`` parses the same ``FeedbackCreate`` body and answers 202;
- ``liveloop``: ``create_app(settings)`` as ``liveloop serve`` runs it (packaged model loaded, engine idle), its
  group-commit writer recording the ratings and its outbox relay thread publishing them to an embedded Tansu
  broker.

One load process drives each with ``--clients`` concurrent keep-alive connections (h11 on uvloop), every request
rating a different stored completion. Reported: accepted events/s, p50/p99 latency, and the ratio to the no-op.
At the end the feedback rows stored and the events on the topic are counted against the 202s: lost must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import h11
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer, TopicPartition  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from feedback.broker import EmbeddedBroker, free_port  # noqa: E402
from liveloop.db import make_engine, make_sessionmaker, migrate  # noqa: E402
from liveloop.settings import Settings  # noqa: E402
from liveloop.tables import Completion, Feedback, OutboxMessage, utcnow  # noqa: E402
from serving.schemas_feedback import FeedbackCreate  # noqa: E402  (module level: FastAPI resolves it by name)

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TOPIC = "feedback-bench"


def serve(kind: str, port: int) -> None:
    """The server process: settings come from LIVELOOP_* variables set by the parent."""
    import uvicorn
    from fastapi import FastAPI

    if kind == "noop":
        app = FastAPI()

        @app.post("/v1/feedback", status_code=202)
        async def noop(body: FeedbackCreate) -> dict:
            return {"id": "fb-noop", "object": "feedback", "completion_id": body.completion_id}
    else:
        from serving.app import create_app

        app = create_app(Settings())
    # keep-alive beyond uvicorn's 5 s: an idle connection closed under the client reads as a failed request
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                http="httptools", timeout_keep_alive=120)


def start_server(kind: str, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], env=env)
    deadline = time.monotonic() + 600  # the first start may convert the packaged model
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the {kind} server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class Connection:
    """One keep-alive HTTP/1.1 connection speaking through h11. httpx's pool was the bottleneck here: at 64
    connections it managed ~200 requests/s against the no-op server, h11 on asyncio streams ~2,000."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer, self.h11 = reader, writer, h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def post_json(self, target: str, body: dict) -> int:
        data = json.dumps(body).encode()
        headers = [("Host", "127.0.0.1"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        self.writer.write(self.h11.send(h11.Request(method="POST", target=target, headers=headers))
                          + self.h11.send(h11.Data(data=data)) + self.h11.send(h11.EndOfMessage()))
        status = 0
        while not isinstance(event := self.h11.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
        self.h11.start_next_cycle()
        return status

    def close(self) -> None:
        self.writer.close()


async def load(port: int, completion_ids: list[str], clients: int) -> tuple[float, list[float], int]:
    """Every completion rated once, by ``clients`` concurrent connections; returns (seconds, latencies, 202s)."""
    latencies: list[float] = []
    accepted = 0
    queue = iter(completion_ids)

    async def client_loop(connection: Connection) -> None:
        nonlocal accepted
        for completion_id in queue:
            body = {"completion_id": completion_id, "rating": random.choice(["up", "down"]),
                    "feedback_id": uuid.uuid4().hex}
            start = time.perf_counter()
            status = await connection.post_json("/v1/feedback", body)
            latencies.append(time.perf_counter() - start)
            accepted += status == 202  # not `accepted += await …`: that reads `accepted` before awaiting

    connections = [await Connection.open(port) for _ in range(clients)]
    start = time.perf_counter()
    await asyncio.gather(*(client_loop(connection) for connection in connections))
    seconds = time.perf_counter() - start
    for connection in connections:
        connection.close()
    return seconds, latencies, accepted


def measure(kind: str, env: dict[str, str], completion_ids: list[str], clients: int, warmup: int,
            before_stop=lambda: None) -> dict:
    process, port = start_server(kind, env)
    try:
        _, _, warm_accepted = uvloop.run(load(port, completion_ids[:warmup], clients))
        seconds, latencies, accepted = uvloop.run(load(port, completion_ids[warmup:], clients))
        before_stop()
    finally:
        process.terminate()
        process.wait(60)
    latencies.sort()
    return {"kind": kind, "requests": len(latencies), "accepted": warm_accepted + accepted,
            "rate": accepted / seconds, "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(0.99 * len(latencies))]}


def add_completions(sessions, count: int) -> list[str]:
    ids = [f"chatcmpl-bench-{uuid.uuid4().hex}" for _ in range(count)]
    now = utcnow()
    with sessions.begin() as session:
        session.add_all(Completion(
            id=completion_id, created_at=now, finished_at=now, user_id=None, end_user=None, requested_model="liveloop",
            adapter_version=None, messages=[{"role": "user", "content": "Say something about the sea."}],
            prompt_token_ids=list(range(24)), response_token_ids=list(range(48)), response_text="…",
            behaviour_logprobs=[-1.0] * 48, sampling_params={"temperature": 0.7, "top_p": 1.0, "max_tokens": 48,
                                                             "seed": None, "stop": []},
            dtype="float32", finish_reason="length", prompt_tokens=24, completion_tokens=48, latency_ms=100.0,
        ) for completion_id in ids)
    return ids


def wait_for_relay(sessions, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as session:
            if not session.scalar(select(func.count()).select_from(OutboxMessage)
                                  .where(OutboxMessage.sent_at.is_(None))):
                return
        time.sleep(0.2)


def count_lost(sessions, settings: Settings, accepted: int) -> dict:
    """The 202s against the feedback rows stored and the distinct events read back from the topic (read, not
    end offsets: Tansu's high watermark can trail the acknowledged records for a moment)."""
    with sessions() as session:
        rows = session.scalar(select(func.count()).select_from(Feedback))
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False)
    consumer.assign([TopicPartition(TOPIC, p) for p in consumer.partitions_for_topic(TOPIC) or ()])
    event_ids: set[str] = set()
    deadline = time.monotonic() + 60
    while len(event_ids) < rows and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500).values():
            event_ids.update(json.loads(record.value)["event_id"] for record in records)
    consumer.close()
    return {"accepted": accepted, "rows": rows, "events": len(event_ids), "lost": accepted - min(rows, len(event_ids))}


def database_url(kind: str, workdir: Path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}"
    import sqlalchemy as sa

    name = f"liveloop_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(url: str) -> None:
    if url.startswith("postgresql"):
        import sqlalchemy as sa

        admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=6400)
    parser.add_argument("--serve", choices=["noop", "liveloop"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return
    warmup = args.clients * 4
    with tempfile.TemporaryDirectory() as workdir, EmbeddedBroker() as broker:
        url = database_url(args.database, Path(workdir))
        migrate(url)
        sessions = make_sessionmaker(make_engine(url))
        completion_ids = add_completions(sessions, warmup + args.requests)
        settings = Settings(_env_file=None, database_url=url, kafka_bootstrap=broker.bootstrap, feedback_topic=TOPIC)
        env = os.environ | {"LIVELOOP_DATABASE_URL": url, "LIVELOOP_KAFKA_BOOTSTRAP": broker.bootstrap,
                            "LIVELOOP_FEEDBACK_TOPIC": TOPIC}
        results = [measure("noop", env, completion_ids, args.clients, warmup),
                   measure("liveloop", env, completion_ids, args.clients, warmup, lambda: wait_for_relay(sessions))]
        delivery = count_lost(sessions, settings, results[1]["accepted"])
        sessions.kw["bind"].dispose()
        drop_database(url)
    noop = results[0]["rate"]
    print(f"\n{args.clients} concurrent clients, {args.requests} requests, {args.database}")
    print(f"{'endpoint':<10} {'events/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'× no-op':>8}")
    for result in results:
        print(f"{result['kind']:<10} {result['rate']:>9.0f} {result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} "
              f"{result['rate'] / noop:>8.2f}")
    print("liveloop 202s (incl. warm-up) {accepted}, feedback rows {rows}, events on the topic {events}: lost {lost}"
          .format(**delivery))


if __name__ == "__main__":
    main()
