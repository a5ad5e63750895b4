"""``/admin/adapters``: see, promote, reject, roll back and compare adapter versions (the CLI's operations).

Only the admin bearer token (``LIVELOOP_ADMIN_TOKEN``) gets in: no token is 401, an end-user API key 403, and
with no admin token configured the whole API answers 403. Handlers are sync: FastAPI runs them in its thread
pool, and the registry's transactions take row locks. Replicas learn of a change through the adapter-events
outbox message each transition writes, and through their registry poll.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from liveloop.registry import Kind, Registry, RegistryError, State, Thumbs, UnknownVersion
from serving.deps import bearer_token
from serving.errors import Conflict, Forbidden, NotFound, Unauthorized
from serving.protocol import ErrorResponse
from serving.schemas_admin import (
    AdapterAction,
    AdapterDetail,
    AdapterDiff,
    AdapterList,
    DiffRowPublic,
    RollbackRequest,
    RollbackResult,
)


def require_admin(request: Request) -> None:
    expected = request.app.state.settings.admin_token
    if expected is None:
        raise Forbidden("The admin API is disabled: set LIVELOOP_ADMIN_TOKEN to enable it.")
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing admin token: send 'Authorization: Bearer <admin token>'.")
    if secrets.compare_digest(token.encode(), expected.get_secret_value().encode()):
        return
    if request.app.state.api_keys.identify(token) is not None:
        raise Forbidden("This API key may chat and rate completions; changing adapters needs the admin token.")
    raise Unauthorized("Incorrect admin token.")


def get_registry(request: Request) -> Registry:
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]
_ERRORS = {code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422)}
router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=_ERRORS)


@contextmanager
def _registry_errors() -> Iterator[None]:
    try:
        yield
    except UnknownVersion as exc:
        raise NotFound(str(exc), param="name") from exc
    except RegistryError as exc:  # an illegal transition, or a decision someone else took first
        raise Conflict(str(exc)) from exc


@router.get("/adapters", response_model=AdapterList)
def list_adapters(registry: RegistryDep, kind: Kind = Kind.POLICY, state: State | None = None,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> AdapterList:
    """The newest versions of one kind with their live thumbs; which one is live and which in canary."""
    versions = registry.versions(kind=kind, states=None if state is None else [state], limit=limit)
    return AdapterList.of(registry.routing(kind), versions, registry.thumbs([v.name for v in versions]))


@router.get("/adapters/{name}", response_model=AdapterDetail)
def show_adapter(name: str, registry: RegistryDep) -> AdapterDetail:
    """One version: gate report, training metrics, lineage, live thumbs and its audit log."""
    with _registry_errors():
        version = registry.get(name)
    thumbs = registry.thumbs([name]).get(name, Thumbs())
    return AdapterDetail.of_version(version, thumbs, registry.audit(name))


@router.post("/adapters/{name}/promote", response_model=AdapterDetail)
def promote_adapter(name: str, body: AdapterAction, registry: RegistryDep) -> AdapterDetail:
    """Make an approved, canary or retired version live now (the live one is retired)."""
    with _registry_errors():
        registry.promote(name, actor=body.actor, reason=body.reason)
    return show_adapter(name, registry)


@router.post("/adapters/{name}/reject", response_model=AdapterDetail)
def reject_adapter(name: str, body: AdapterAction, registry: RegistryDep) -> AdapterDetail:
    """Keep a candidate, approved or canary version from users for good."""
    with _registry_errors():
        registry.reject(name, actor=body.actor, reason=body.reason)
    return show_adapter(name, registry)


@router.post("/adapters/rollback", response_model=RollbackResult)
def rollback(body: RollbackRequest, registry: RegistryDep) -> RollbackResult:
    """Mark the live version rolled back and return to ``to`` or to the version it replaced."""
    with _registry_errors():
        rolled_back = registry.routing(body.kind).live
        live = registry.rollback(body.kind, to=body.to, actor=body.actor, reason=body.reason,
                                 expect_live=rolled_back)
    return RollbackResult(rolled_back=rolled_back, live=None if live is None else live.name)


@router.get("/adapters/{name}/diff/{other}", response_model=AdapterDiff)
def diff_adapters(name: str, other: str, registry: RegistryDep) -> AdapterDiff:
    """Two versions side by side: lineage, training metrics, gate values, live thumbs."""
    with _registry_errors():
        rows = registry.diff(name, other)
    return AdapterDiff(a=name, b=other, rows=[DiffRowPublic.of(row) for row in rows])
