"""Dependencies injected into route handlers: settings, services, and the caller's identity."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from liveloop.settings import Settings
from serving.api_keys import ApiKeys
from serving.chat import ChatService
from serving.errors import Unauthorized


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_chat(request: Request) -> ChatService:
    return request.app.state.chat


async def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def bearer_token(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def get_user(request: Request) -> str | None:
    """The identity of the caller's API key; None when no keys are configured (the open embedded default)."""
    api_keys: ApiKeys = request.app.state.api_keys
    if not api_keys:
        return None
    token = bearer_token(request)
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    user = api_keys.identify(token)
    if user is None:
        raise Unauthorized("Incorrect API key provided.")
    return user


SettingsDep = Annotated[Settings, Depends(get_settings)]
ChatDep = Annotated[ChatService, Depends(get_chat)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
UserDep = Annotated[str | None, Depends(get_user)]
