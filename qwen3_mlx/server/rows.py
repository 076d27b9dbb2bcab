"""The engine rows one HTTP request runs, as one stream of `(choice index, event)`.

A request is one row, or several: `n` choices of a prompt, a completion's list of prompts. Each
row is a `GenerationRequest` of its own (its own `Sequence`, seed and grammar state) whose events
arrive tagged with its choice index in one queue, so replies are written in the order the rows
produce them. They are submitted together; the engine prefills a shared prompt once (the other
rows wait for its prefix, then start from it).

A client that leaves cancels every row it still had running; a row that fails fails the request
(a 500, or an error event in a stream) and cancels the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..generation import Sequence as Row
from .engine import Engine, EngineBusy, Failed, Finished, GenerationRequest, Output
from .guard import error_body
from .models import LoadedModel
from .output.common import sse
from .prepare import ApiError

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def openai_error_event(e: ApiError | EngineBusy) -> str:
    """An error after a stream began, as OpenAI's clients read it: an event holding the error."""
    if isinstance(e, EngineBusy):
        return sse(error_body(str(e), type="server_overloaded", code="queue_full"))
    return sse(error_body(e.message, type=e.type))


class RowChannel:
    """One row's side of the request's event queue: events are tagged with the row's index."""

    def __init__(self, queue: asyncio.Queue, index: int, loop: asyncio.AbstractEventLoop):
        self.queue, self.index, self.loop = queue, index, loop

    def put(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))
        except RuntimeError:
            pass  # the event loop is gone (server shutting down)


class Rows:
    """`groups`: each distinct prompt's rows, in choice order (choice indices count across)."""

    def __init__(self, engine: Engine, model: LoadedModel, groups: Sequence[Sequence[Row]]):
        self.engine = engine
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.requests: list[GenerationRequest] = []
        self.leaders: list[int] = []  # the first row of each prompt (usage counts it once)
        for group in groups:
            self.leaders.append(len(self.requests))
            for seq in group:
                channel = RowChannel(self.queue, len(self.requests), loop)
                self.requests.append(GenerationRequest(model=model, sequence=seq, channel=channel))
        self.submitted: list[int] = []
        self.done: set[int] = set()

    def __len__(self) -> int:
        return len(self.requests)

    def submit(self) -> None:
        """Queue every row (EngineBusy: none of them runs)."""
        try:
            for i in range(len(self.requests)):
                self.engine.submit(self.requests[i])
                self.submitted.append(i)
        except EngineBusy:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the rows still running (the client left, or another row failed)."""
        left = [i for i in self.submitted if i not in self.done]
        for i in left:
            if not self.requests[i].sequence.finished:
                self.requests[i].cancel()
                self.engine.withdraw(self.requests[i])
        if left:
            self.engine.wake()

    async def events(self, http: Request) -> AsyncIterator[tuple[int, Output | Finished]]:
        """Every row's events up to its Finished; stops early if the client disconnects."""
        try:
            while len(self.done) < len(self.requests):
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if isinstance(event, Failed):
                    raise ApiError(500, event.message)
                if isinstance(event, Finished):
                    self.done.add(index)
                yield index, event
        finally:
            self.cancel()

    async def collect(self, http: Request, on_output: Callable[[int, object], None]):
        """Run to the end, handing each step output to `on_output`; the rows' Finished events."""
        finished: dict[int, Finished] = {}
        async for index, event in self.events(http):
            if isinstance(event, Output):
                on_output(index, event.step)
            else:
                finished[index] = event
        if len(finished) < len(self.requests) or any(
            f.finish_reason == "abort" for f in finished.values()
        ):
            raise ApiError(499, "client disconnected")
        return [finished[i] for i in range(len(self.requests))]

    async def reply(
        self,
        http: Request,
        builder,
        stream: bool,
        body: Callable[[], object],
        error_event: Callable[[ApiError | EngineBusy], str] = openai_error_event,
    ) -> StreamingResponse | JSONResponse:
        """One row's reply made by `builder` (`start()` → head lines, `step(output)` and
        `finish(finished)` → event lines): streamed as those events, or once finished `body()`
        as JSON."""
        if stream:
            return self.stream(
                http,
                builder.start(),
                lambda _, step: builder.step(step),
                lambda _, finished: builder.finish(finished),
                lambda _: [],
                error_event=error_event,
            )
        builder.start()
        finished = await self.collect(http, lambda _, step: builder.step(step))
        builder.finish(finished[0])
        return JSONResponse(body())

    def stream(
        self,
        http: Request,
        head: list[str],
        on_output: Callable[[int, object], list[str]],
        on_finish: Callable[[int, Finished], list[str]],
        on_end: Callable[[list[Finished]], list[str]],
        error_event: Callable[[ApiError | EngineBusy], str] = openai_error_event,
        media_type: str = "text/event-stream",
    ) -> StreamingResponse:
        """SSE (or, with another `media_type`, the lines as they are: Ollama's JSON lines):
        `head`, then each event's lines, then (all rows finished) `on_end`'s; an error once the
        stream began (the status is sent) becomes the API's `error_event`."""

        async def body():
            for line in head:
                yield line
            finished: dict[int, Finished] = {}
            try:
                async for index, event in self.events(http):
                    if isinstance(event, Output):
                        lines = on_output(index, event.step)
                    else:
                        finished[index] = event
                        lines = on_finish(index, event)
                    for line in lines:
                        yield line
                if len(finished) == len(self.requests):
                    for line in on_end([finished[i] for i in range(len(self.requests))]):
                        yield line
            except (ApiError, EngineBusy) as e:
                yield error_event(e)

        # Runs after the response ends, also when Starlette cancels it because the client left:
        # the slots are freed even if the generator above is never resumed.
        return StreamingResponse(
            body(),
            media_type=media_type,
            headers=SSE_HEADERS,
            background=BackgroundTask(self.cancel),
        )
