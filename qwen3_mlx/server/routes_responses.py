"""OpenAI's Responses API: `POST /v1/responses` through chat's path, and stored responses.

A response is stored unless the request says `store: false` (response_store.py keeps the
latest `--responses-store-size`, each for `--responses-max-age` seconds). `previous_response_id`
continues the stored conversation: its messages, then this request's input, as one chat
request, whose prompt starts with the previous turn's (the prefix cache holds it).
`GET /v1/responses/{id}` returns a stored response, `DELETE` forgets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from .output.responses import ResponsesBuilder
from .prepare import ApiError, prepare_chat
from .protocol import ResponsesRequest
from .protocol.common import new_id, now
from .protocol.responses import ResponseDeleted, ResponseObject
from .responses_input import input_messages, output_messages, responses_to_chat

if TYPE_CHECKING:
    from .routes import Api


def _stored(api: Api, response_id: str):
    stored = api.response_store.get(response_id)
    if stored is None:
        raise ApiError(
            404,
            f"no stored response {response_id!r} (responses are kept for "
            f"{api.response_store.max_age_seconds:g} s, the latest "
            f"{api.response_store.max_entries}; a request with store: false is not kept)",
            param="response_id",
            code="response_not_found",
        )
    return stored


async def create_response(api: Api, http: Request, body: ResponsesRequest):
    history: list[dict[str, Any]] = []
    if body.previous_response_id:
        try:
            history = _stored(api, body.previous_response_id).messages
        except ApiError as e:
            e.param = "previous_response_id"
            raise
    chat_body = responses_to_chat(body, history)
    model = await api.load(chat_body.model)
    prepared = await run_in_threadpool(prepare_chat, chat_body, model, api.limits)
    running = api.start(model, [[prepared.sequence]])
    store = body.store is not False
    echo = {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "temperature": prepared.params.temperature,
        "top_p": prepared.params.top_p,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "tool_choice": body.tool_choice or "auto",
        "tools": jsonable_encoder([t.model_dump(exclude_none=True) for t in body.tools or []]),
        "metadata": body.metadata,
        "previous_response_id": body.previous_response_id,
        "store": store,
    }
    builder = ResponsesBuilder(
        id=f"resp_{new_id('r')[2:]}", created=now(), model=model, request=echo
    )
    conversation = history + input_messages(body.input)

    def finish(finished) -> tuple[dict, list[str]]:
        response, events = builder.finish(finished)
        if store:
            turn = conversation + output_messages(response["output"])
            api.response_store.put(response["id"], response, turn, model.id)
        return response, events

    if body.stream:
        return running.stream(
            http,
            builder.start(),
            lambda _, step: builder.step(step),
            lambda _, finished: finish(finished)[1],
            lambda _: [],
        )
    builder.start()
    finished = await running.collect(http, lambda _, step: builder.step(step))
    response, _ = finish(finished[0])
    return JSONResponse(response)


def register_responses(app: FastAPI, api: Api) -> None:
    """GET and DELETE of stored responses (POST is in routes.ROUTES, beside the other /v1
    operations)."""
    router = APIRouter(prefix="/v1")

    async def get_response(response_id: str):
        return JSONResponse(_stored(api, response_id).response)

    async def delete_response(response_id: str):
        _stored(api, response_id)
        api.response_store.delete(response_id)
        return ResponseDeleted(id=response_id)

    from .routes import Route, responses_of

    for method, handler, model in (
        ("GET", get_response, ResponseObject),
        ("DELETE", delete_response, ResponseDeleted),
    ):
        route = Route(method, "/responses/{response_id}", "", model, errors=(404,))
        router.add_api_route(
            route.path, handler, methods=[method], response_model=model,
            responses=responses_of(route), name=f"{method.lower()}_response",
        )  # fmt: skip
    app.include_router(router)
