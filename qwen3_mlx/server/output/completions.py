"""`/v1/completions` replies: a whole `text_completion`, or its chunks as SSE lines.

One choice per row: a request's prompts (a list of several is served in one batch) times its
`n`, choice `p * n + j` being prompt p's j-th. With `echo` a choice's text starts with its prompt,
and its logprobs with the prompt's tokens (the first has no logprob: nothing comes before it);
`text_offset` indexes into the returned text, prompt included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..jobs import Finished
from ..models import LoadedModel
from ..protocol import Completion, CompletionChoice, CompletionLogprobs
from .common import TokenText, chunk_sse, dump, finish_reason, sse, usage_of
from .lmstudio import extras, stats_of


@dataclass
class Echo:
    """A prompt as a completion echoes it: its text and, with logprobs, its tokens."""

    text: str
    logprobs: CompletionLogprobs | None


def echo_of(
    model: LoadedModel,
    prompt: list[int],
    *,
    want_logprobs: bool,
    top_n: int,
    scores: tuple[list[float], list[list[tuple[int, float]]]] | None,
) -> Echo:
    """`scores`: each prompt token's logprob after the ones before it (and the top `top_n`), from
    the first token's successor on (`scores.PromptScorer`); None where they can't be computed."""
    detokenizer = model.tokenizer.detokenizer()
    offsets = []
    for token in prompt:
        offsets.append(len(detokenizer.text))
        detokenizer.add_token(token)
    detokenizer.finalize()
    if not want_logprobs:
        return Echo(detokenizer.text, None)
    text_of = TokenText(model.tokenizer)
    names = {t: text_of(t)[0] for t in set(prompt)}
    values: list[float | None] = [None] * len(prompt)
    tops: list[dict[str, float] | None] = [None] * len(prompt)
    if scores is not None:
        chosen, top = scores
        values[1:] = chosen
        tops[1:] = [{text_of(t)[0]: v for t, v in row} for row in top] if top_n else tops[1:]
    logprobs = CompletionLogprobs(
        tokens=[names[t] for t in prompt],
        token_logprobs=values,
        top_logprobs=tops if top_n else None,
        text_offset=offsets,
    )
    return Echo(detokenizer.text, logprobs)


class ChoiceText:
    """One choice's text and logprobs as they accumulate (starting with its echoed prompt)."""

    def __init__(self, tokens: TokenText, want_logprobs: bool, top_n: int, echo: Echo | None):
        self.tokens = tokens
        self.text: list[str] = [echo.text] if echo else []
        self.offset = len(echo.text) if echo else 0
        self.logprobs = None
        if want_logprobs:
            start = echo.logprobs if echo and echo.logprobs else CompletionLogprobs()
            self.logprobs = start.model_copy(deep=True)
            if top_n and self.logprobs.top_logprobs is None:
                self.logprobs.top_logprobs = []

    def add(self, step) -> CompletionLogprobs | None:
        """Append a step; return this step's logprobs (for streaming)."""
        self.text.append(step.text)
        if self.logprobs is None or step.logprobs is None:
            self.offset += len(step.text)
            return None
        lp = step.logprobs
        piece = CompletionLogprobs(
            tokens=[self.tokens(lp.token)[0]],
            token_logprobs=[lp.logprob],
            top_logprobs=[{self.tokens(t)[0]: v for t, v in lp.top}]
            if self.logprobs.top_logprobs is not None
            else None,
            text_offset=[self.offset],
        )
        self.offset += len(step.text)
        self.logprobs.tokens += piece.tokens
        self.logprobs.token_logprobs += piece.token_logprobs
        self.logprobs.text_offset += piece.text_offset
        if piece.top_logprobs is not None:
            self.logprobs.top_logprobs += piece.top_logprobs
        return piece


class CompletionReply:
    """A completion's choices, whole (`add` then `response`) or streamed (`head`, `step`,
    `finish` per choice, then `end`)."""

    def __init__(
        self,
        *,
        id: str,
        created: int,
        model: LoadedModel,
        echoes: Sequence[Echo | None],
        want_logprobs: bool,
        top_n: int,
        leaders: Sequence[int],
        lmstudio: bool,
        include_usage: bool = False,
    ):
        self.id, self.created, self.model = id, created, model
        tokens = TokenText(model.tokenizer)
        self.echoes = list(echoes)
        self.choices = [ChoiceText(tokens, want_logprobs, top_n, e) for e in self.echoes]
        self.leaders = list(leaders)
        self.lmstudio = lmstudio
        self.include_usage = include_usage

    def add(self, index: int, step) -> None:
        self.choices[index].add(step)

    def response(self, finished: Sequence[Finished]) -> dict:
        choices = [
            CompletionChoice(
                index=i, text="".join(c.text), logprobs=c.logprobs, finish_reason=finish_reason(f)
            )
            for i, (c, f) in enumerate(zip(self.choices, finished, strict=True))
        ]
        reply = Completion(
            id=self.id,
            created=self.created,
            model=self.model.id,
            choices=choices,
            usage=usage_of(finished, self.leaders),
            **extras(self.model, finished, self.lmstudio),
        )
        return dump(reply)

    # streaming
    def _chunk(self, index: int | None, text: str = "", **fields) -> str:
        extra = {k: fields.pop(k) for k in ("usage", "stats") if k in fields}
        choices = [] if index is None else [CompletionChoice(index=index, text=text, **fields)]
        chunk = Completion(
            id=self.id, created=self.created, model=self.model.id, choices=choices, **extra
        )
        return chunk_sse(chunk)

    def head(self) -> list[str]:
        return [
            self._chunk(i, e.text, logprobs=e.logprobs)
            for i, e in enumerate(self.echoes)
            if e is not None
        ]

    def step(self, index: int, step) -> list[str]:
        piece = self.choices[index].add(step)
        if not step.text and piece is None:
            return []
        return [self._chunk(index, step.text, logprobs=piece)]

    def finish(self, index: int, f: Finished) -> list[str]:
        stats = stats_of([f]) if self.lmstudio else None
        return [self._chunk(index, finish_reason=finish_reason(f), stats=stats)]

    def end(self, finished: Sequence[Finished]) -> list[str]:
        usage = [self._chunk(None, usage=usage_of(finished, self.leaders))]
        return (usage if self.include_usage else []) + [sse("[DONE]")]
