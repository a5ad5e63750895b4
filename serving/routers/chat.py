from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.deps import ChatDep, UserDep
from serving.protocol import ChatCompletion, ChatCompletionRequest, ErrorResponse

router = APIRouter(prefix="/v1", tags=["chat"])

VERSION_HEADER = "X-Liveloop-Model-Version"
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)}


@router.post("/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
async def create_chat_completion(body: ChatCompletionRequest, chat: ChatDep, user: UserDep, request: Request):
    generation = await chat.start(body, user_id=user)
    headers = {VERSION_HEADER: generation.served_name}
    if body.stream:
        return StreamingResponse(chat.sse(generation), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    completion = await chat.complete(generation, request.is_disconnected)
    return JSONResponse(completion.model_dump(exclude_none=True), headers=headers)
