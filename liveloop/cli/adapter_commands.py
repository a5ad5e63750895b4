"""``liveloop adapters list | show V | promote V | reject V | rollback [--to V] | diff V1 V2``.

The engineer's view of the registry, straight from the database (no API process needed): every change goes
through the same guarded registry transitions as the admin API, and serving replicas pick it up from the
adapter-events outbox message and their registry poll.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.table import Table

from liveloop.registry import Kind, Registry, RegistryError, State, Thumbs
from liveloop.tables import AdapterVersion

app = typer.Typer(help="Adapter versions: see, promote, reject, roll back, compare.", no_args_is_help=True)
console = Console()

_STATE_STYLE = {State.PROMOTED: "bold green", State.CANARY: "yellow", State.APPROVED: "cyan",
                State.REJECTED: "red", State.ROLLED_BACK: "red", State.RETIRED: "dim", State.CANDIDATE: ""}
ActorOption = typer.Option(None, help="Who decides, for the audit log; default: your login name.")
ReasonOption = typer.Option(..., "--reason", "-r", help="Why, for the audit log.")


@contextmanager
def _registry() -> Iterator[Registry]:
    """The configured database's registry; a registry error ends the command with its message."""
    from liveloop.cli import _settings
    from liveloop.db import make_sessionmaker, open_database
    from liveloop.registry import open_registry

    settings = _settings()
    engine = open_database(settings)
    try:
        yield open_registry(make_sessionmaker(engine), settings)
    except RegistryError as exc:
        console.print(f"[red]{type(exc).__name__}:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        engine.dispose()


@app.command("list")
def list_versions(kind: Kind = typer.Option(Kind.POLICY, help="policy or reward"),
                  state: State = typer.Option(None, help="Only versions in this state."),
                  limit: int = typer.Option(50, min=1, help="Show the newest this many.")) -> None:
    """Versions, newest first, with gate verdicts and live thumbs-up rates."""
    with _registry() as registry:
        versions = registry.versions(kind=kind, states=None if state is None else [state], limit=limit)
        thumbs = registry.thumbs([v.name for v in versions])
        routing = registry.routing(kind)
    table = Table("version", "state", "created (UTC)", "parent", "reward", "events", "gates", "thumbs-up",
                  title=f"{kind} adapters — live: {routing.live or 'base model'}, canary: {routing.canary or '–'}")
    for v in versions:
        table.add_row(v.name, _state(v.state), f"{v.created_at:%Y-%m-%d %H:%M}", v.parent or "base",
                      v.reward_source or "–", str(len(v.consumed_event_ids)), _verdict(v),
                      _rate(thumbs.get(v.name, Thumbs())))
    console.print(table)


@app.command()
def show(version: str) -> None:
    """One version: summary and lineage, gate report, training metrics, audit log."""
    with _registry() as registry:
        v = registry.get(version)
        thumbs, audit = registry.thumbs([version]).get(version, Thumbs()), registry.audit(version)
    summary = Table.grid(padding=(0, 2))
    for label, value in [("version", v.name), ("kind", v.kind), ("state", _state(v.state)), ("sha256", v.sha256),
                         ("base model", v.base_model_id), ("created", f"{v.created_at:%Y-%m-%d %H:%M:%S}"),
                         ("parent", v.parent or "base"), ("predecessor", v.predecessor or "–"),
                         ("reward source", v.reward_source or "–"), ("events trained on", len(v.consumed_event_ids)),
                         ("kafka offsets", json.dumps(v.kafka_offsets)), ("thumbs-up", _rate(thumbs))]:
        summary.add_row(f"[bold]{label}[/bold]", str(value))
    console.print(summary)
    console.print(_gate_table(v))
    metrics = Table("metric", "value", title="training metrics")
    for key, value in sorted(v.training_metrics.items()):
        metrics.add_row(key, _number(value))
    console.print(metrics)
    history = Table("when (UTC)", "from", "to", "actor", "reason", title="audit log")
    for t in reversed(audit):
        history.add_row(f"{t.at:%Y-%m-%d %H:%M:%S}", t.from_state or "–", _state(t.to_state), t.actor, t.reason)
    console.print(history)


@app.command()
def promote(version: str, reason: str = ReasonOption, actor: str = ActorOption) -> None:
    """Make an approved, canary or retired version live now (the live one is retired)."""
    with _registry() as registry:
        registry.promote(version, actor=actor or getpass.getuser(), reason=reason)
    console.print(f"{version} is live")


@app.command()
def reject(version: str, reason: str = ReasonOption, actor: str = ActorOption) -> None:
    """Keep a candidate, approved or canary version from users for good."""
    with _registry() as registry:
        registry.reject(version, actor=actor or getpass.getuser(), reason=reason)
    console.print(f"{version} is rejected")


@app.command()
def rollback(to: str = typer.Option(None, "--to", help="A retired version; default: the one the live replaced."),
             reason: str = ReasonOption, actor: str = ActorOption,
             kind: Kind = typer.Option(Kind.POLICY, help="policy or reward")) -> None:
    """Mark the live version rolled back and serve the version it replaced (or --to) again."""
    with _registry() as registry:
        rolled_back = registry.routing(kind).live
        live = registry.rollback(kind, to=to, actor=actor or getpass.getuser(), reason=reason,
                                 expect_live=rolled_back)
    console.print(f"{rolled_back} rolled back; live: {live.name if live else 'the base model'}")


@app.command()
def diff(version: str, other: str) -> None:
    """Two versions side by side; rows that differ are highlighted."""
    with _registry() as registry:
        rows = registry.diff(version, other)
    table = Table("", version, other)
    for row in rows:
        style = "bold" if row.differs else "dim"
        table.add_row(row.field, _number(row.a), _number(row.b), style=style)
    console.print(table)


def _gate_table(v: AdapterVersion) -> Table:
    table = Table("gate", "value", "threshold", "pass", "details", title="gate report")
    for gate in (v.gate_report or {}).get("gates", []):
        table.add_row(gate["name"], _number(gate["value"]), _number(gate["threshold"]),
                      "[green]✓[/green]" if gate["passed"] else "[red]✗[/red]",
                      json.dumps(gate["details"], default=str)[:80])
    return table


def _state(state: str) -> str:
    style = _STATE_STYLE.get(State(state), "")
    return f"[{style}]{state}[/{style}]" if style else state


def _verdict(v: AdapterVersion) -> str:
    if v.gate_report is None:
        return "–"
    return "[green]pass[/green]" if v.gate_report.get("passed") else "[red]fail[/red]"


def _rate(thumbs: Thumbs) -> str:
    return "–" if thumbs.rate is None else f"{thumbs.rate:.1%} of {thumbs.n}"


def _number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "–" if value is None else str(value)
