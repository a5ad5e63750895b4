from __future__ import annotations

from fastapi import APIRouter, Request

from serving.deps import UserDep
from serving.protocol import ModelList

router = APIRouter(prefix="/v1", tags=["models"])


@router.get("/models", response_model=ModelList)
async def list_models(request: Request, _: UserDep) -> ModelList:
    """The live alias first, then the base model and every servable adapter version."""
    return ModelList(data=request.app.state.adapters.model_cards())
