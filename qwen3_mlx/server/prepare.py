"""From a validated API request to what the engine runs: prompt tokens, sampling, grammar, limits.

Chat, text completions, LM Studio's endpoints and the Responses API (translated to chat in
`responses_input`) all end up here, so thinking switches, tool handling, length checks and
sampling defaults behave the same on every route. A request for `n` choices (or several
prompts) becomes one `Sequence` per row (`rows`). Errors are `ApiError`s carrying the status and
the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import Qwen3MLXError
from ..generation import Sequence
from ..sampling import SamplingParams
from ..template import generation_prompt_state, render_chat, thinking_enabled
from .constrain import Constraint, GrammarFactory
from .models import LoadedModel
from .protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    NamedToolChoice,
    ResponseFormat,
    SamplingFields,
)


class ApiError(Exception):
    """An error the client caused (or a refusal): becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


@dataclass
class Prepared:
    """Everything the engine needs for one request, plus what the response writer needs."""

    model: LoadedModel
    prompt: list[int]
    params: SamplingParams
    sequence: Sequence
    constraint: Constraint | None
    prompt_state: str
    parse_tools: bool
    thinking: bool


@dataclass
class Limits:
    max_tokens: int | None = None  # --max-tokens-limit: refuse requests asking for more


# reasoning_effort → (most thinking tokens, most share of max_tokens): the answer keeps room.
# "none" turns thinking off instead (thinking_switch); an explicit thinking_budget wins.
EFFORT_BUDGETS = {
    "minimal": (256, 0.1),
    "low": (1024, 0.25),
    "medium": (4096, 0.5),
    "high": (16384, 0.8),
}


def rows(prepared: Prepared, n: int, first: int = 0) -> list[Sequence]:
    """`n` rows of one prepared prompt: choice `first + i` samples with `seed + first + i` when
    a seed is set (else with fresh entropy) and has its own grammar state."""
    out, seq, seed = [], prepared.sequence, prepared.params.seed
    for i in range(first, first + n):
        if i == first and (i == 0 or seed is None):
            out.append(seq)
            continue
        params = replace(prepared.params, seed=None if seed is None else (seed + i) % 2**64)
        constraint = prepared.constraint and grammar_factory(prepared.model).rebuild(
            prepared.constraint.spec
        )
        out.append(
            make_sequence(
                prepared.model,
                prepared.prompt,
                params,
                prompt_state=seq.prompt_state,
                parse_tools=prepared.parse_tools,
                thinking_budget=seq.thinking_budget,
                constraint=constraint,
            )
        )
    return out


# -- messages ---------------------------------------------------------------------------------


def _text_of(message: ChatMessage, index: int) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("text", "input_text", "output_text"):
            raise ApiError(
                400,
                f"messages[{index}].content: '{part.type}' parts are not supported "
                "(this is a text-only model)",
                param=f"messages.{index}.content",
            )
        texts.append(part.text)
    return "".join(texts)


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages → the plain dicts the chat template reads (known fields only)."""
    out = []
    for i, m in enumerate(messages):
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        item: dict[str, Any] = {"role": role, "content": _text_of(m, i) or ""}
        if m.name is not None:
            item["name"] = m.name
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in m.tool_calls
            ]
        if m.tool_call_id is not None:
            item["tool_call_id"] = m.tool_call_id
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if reasoning:
            item["reasoning_content"] = reasoning
        out.append(item)
    return out


# -- shared pieces ------------------------------------------------------------------------------


def check_generates(model: LoadedModel, draft: str | None = None) -> None:
    """A chat model, and the draft a request names (LM Studio's `draft_model`) is the loaded one."""
    if model.kind != "llm":
        raise ApiError(
            400, f"model '{model.id}' is an embedding model; use /v1/embeddings", param="model"
        )
    loaded = model.drafting.name if model.drafting is not None else None
    if draft is not None and draft != loaded:
        raise ApiError(
            400,
            f"draft_model '{draft}' is not loaded (--draft-model: {loaded})",
            param="draft_model",
        )


def check_prompt_length(model: LoadedModel, n_prompt: int, param: str) -> None:
    if n_prompt >= model.context_length:
        raise ApiError(
            400,
            f"the prompt is {n_prompt} tokens but model '{model.id}' has a context of "
            f"{model.context_length} tokens (prompt plus output must fit)",
            param=param,
            code="context_length_exceeded",
        )


# Over-long prompts are counted in pieces of this many characters: the tokenizer holds the GIL
# while it works, so one huge call would stall every other request for seconds.
PIECE_CHARS = 256 * 1024


def encode_bounded(model: LoadedModel, text: str, param: str) -> list[int]:
    """Tokenize `text`, refusing early one that can't fit the model's context: at once when its
    length alone rules it out, else after counting its tokens piece by piece."""
    tokenizer, limit = model.tokenizer, model.context_length

    def too_long(n: str) -> ApiError:
        return ApiError(
            400,
            f"the prompt is {n} tokens but model '{model.id}' has a context of {limit} tokens "
            "(prompt plus output must fit)",
            param=param,
            code="context_length_exceeded",
        )

    if len(text) > limit * tokenizer.max_token_chars:
        raise too_long(f"over {limit}")
    if len(text) > 2 * PIECE_CHARS:
        counted = 0
        for start in range(0, len(text), PIECE_CHARS):
            counted += len(tokenizer.encode(text[start : start + PIECE_CHARS]))
            # A cut can split a token in two, never more: allow one extra token per cut.
            if counted - start // PIECE_CHARS > limit:
                raise too_long(f"over {limit}")
    return tokenizer.encode(text)


def resolve_max_tokens(
    model: LoadedModel, n_prompt: int, requested: int | None, limits: Limits
) -> int:
    """None or -1: until the context ends (capped by --max-tokens-limit); else checked."""
    room = model.context_length - n_prompt
    if requested is None or requested == -1:
        return room if limits.max_tokens is None else min(room, limits.max_tokens)
    if limits.max_tokens is not None and requested > limits.max_tokens:
        raise ApiError(
            400,
            f"max_tokens {requested} exceeds this server's limit of {limits.max_tokens} "
            "(--max-tokens-limit)",
            param="max_tokens",
        )
    return min(requested, room)


def sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int,
    logprobs: bool,
    top_logprobs: int,
    thinking: bool,
    model: LoadedModel,
) -> SamplingParams:
    repetition = (
        body.repetition_penalty if body.repetition_penalty is not None else body.repeat_penalty
    )
    params = SamplingParams(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repetition_penalty=repetition,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=dict(body.logit_bias) if body.logit_bias else None,
        seed=None if body.seed is None else body.seed % 2**64,
        max_tokens=max_tokens,
        stop=body.stop,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stop_token_ids=sorted(model.eos_token_ids),
    )
    try:
        params = params.resolve(thinking=thinking, generation_config=model.generation_config)
        return params.validate(vocab_size=model.model.args.vocab_size)
    except Qwen3MLXError as e:
        raise ApiError(400, str(e), param=str(e).split(":")[0].split("[")[0]) from None


def grammar_factory(model: LoadedModel) -> GrammarFactory:
    factory = getattr(model, "_grammar_factory", None)
    if factory is None:
        factory = GrammarFactory(
            model.tokenizer, model.model.args.vocab_size, sorted(model.eos_token_ids)
        )
        model._grammar_factory = factory
    return factory


def response_format_constraint(model: LoadedModel, fmt: ResponseFormat | None) -> Constraint | None:
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None
    if fmt.type == "json_schema" and not schema:
        schema = {"type": "object"}
    try:
        return grammar_factory(model).json(schema, "response_format")
    except (Qwen3MLXError, ValueError) as e:
        raise ApiError(400, str(e), param="response_format") from None


def make_sequence(
    model: LoadedModel,
    prompt: list[int],
    params: SamplingParams,
    *,
    prompt_state: str,
    parse_tools: bool,
    thinking_budget: int | None,
    constraint: Constraint | None = None,
) -> Sequence:
    try:
        return Sequence(
            model.tokenizer,
            prompt,
            params,
            prompt_state=prompt_state,
            thinking_budget=thinking_budget,
            parse_tools=parse_tools,
            vocab_size=model.model.args.vocab_size,
            constraint=constraint,
        )
    except Qwen3MLXError as e:
        raise ApiError(400, str(e)) from None


# -- chat ---------------------------------------------------------------------------------------


def thinking_switch(body: ChatCompletionRequest) -> bool:
    """enable_thinking from chat_template_kwargs / the top-level field / reasoning_effort."""
    enable = True
    kwargs = body.chat_template_kwargs or {}
    if "enable_thinking" in kwargs:
        enable = bool(kwargs["enable_thinking"])
    if body.enable_thinking is not None:
        enable = body.enable_thinking
    if body.reasoning_effort == "none":
        enable = False
    return enable


def thinking_budget(body: ChatCompletionRequest, max_tokens: int) -> int | None:
    """`thinking_budget` if given, else what `reasoning_effort` grants (EFFORT_BUDGETS)."""
    if body.thinking_budget is not None:
        return body.thinking_budget
    if body.reasoning_effort in EFFORT_BUDGETS:
        most, share = EFFORT_BUDGETS[body.reasoning_effort]
        return min(most, int(max_tokens * share))
    return None


def prepare_chat(body: ChatCompletionRequest, model: LoadedModel, limits: Limits) -> Prepared:
    check_generates(model, body.draft_model)
    messages = messages_to_dicts(body.messages)
    enable_thinking = thinking_switch(body)
    tool_choice = body.tool_choice or ("auto" if body.tools else "none")
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    use_tools = bool(tools) and tool_choice != "none"
    extra = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k != "enable_thinking"}
    try:
        text = render_chat(
            messages,
            tools if use_tools else None,
            enable_thinking=enable_thinking,
            chat_template=model.tokenizer.chat_template,
            **{**model.tokenizer.special_tokens_map, **extra},
        )
    except Qwen3MLXError as e:
        raise ApiError(400, str(e), param="messages") from None
    prompt = encode_bounded(model, text, "messages")
    check_prompt_length(model, len(prompt), "messages")
    requested = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    max_tokens = resolve_max_tokens(model, len(prompt), requested, limits)
    thinking = thinking_enabled(messages, default=enable_thinking)
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        thinking=thinking,
        model=model,
    )

    constraint = None
    if use_tools and (tool_choice == "required" or isinstance(tool_choice, NamedToolChoice)):
        if body.response_format is not None and body.response_format.type != "text":
            raise ApiError(
                400,
                "tool_choice 'required' or a named function cannot be combined with "
                "response_format",
                param="response_format",
            )
        chosen = [t["function"] for t in tools]
        if isinstance(tool_choice, NamedToolChoice):
            chosen = [f for f in chosen if f["name"] == tool_choice.function.name]
        parallel = body.parallel_tool_calls is not False and not isinstance(
            tool_choice, NamedToolChoice
        )
        try:
            constraint = grammar_factory(model).tool_calls(chosen, parallel, "tool_choice")
        except (Qwen3MLXError, ValueError) as e:
            raise ApiError(400, str(e), param="tools") from None
    else:
        constraint = response_format_constraint(model, body.response_format)

    state = generation_prompt_state(text)
    sequence = make_sequence(
        model,
        prompt,
        params,
        prompt_state=state,
        parse_tools=use_tools,
        thinking_budget=thinking_budget(body, max_tokens) if thinking else None,
        constraint=constraint,
    )
    return Prepared(model, prompt, params, sequence, constraint, state, use_tools, thinking)


# -- text completions -------------------------------------------------------------------------


def completion_prompts(body: CompletionRequest) -> list[str | list[int]]:
    """The request's prompts: one string or token-id list, or several."""
    several = isinstance(body.prompt, list) and isinstance(body.prompt[0], str | list)
    return list(body.prompt) if several else [body.prompt]


def prepare_completion(
    body: CompletionRequest, model: LoadedModel, limits: Limits
) -> list[Prepared]:
    """One `Prepared` per prompt of the request."""
    check_generates(model, body.draft_model)
    return [_prepare_prompt(body, model, limits, p) for p in completion_prompts(body)]


def _prepare_prompt(body: CompletionRequest, model: LoadedModel, limits: Limits, prompt_in):
    if isinstance(prompt_in, str):
        prompt = encode_bounded(model, prompt_in, "prompt")
    else:
        vocab = model.model.args.vocab_size
        bad = [t for t in prompt_in if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400,
                f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                param="prompt",
            )
        prompt = list(prompt_in)
    if not prompt:
        raise ApiError(400, "prompt is empty", param="prompt")
    check_prompt_length(model, len(prompt), "prompt")
    max_tokens = resolve_max_tokens(model, len(prompt), body.max_tokens, limits)
    params = sampling_params(
        body,
        max_tokens=max_tokens,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
        thinking=False,
        model=model,
    )
    constraint = response_format_constraint(model, body.response_format)
    sequence = make_sequence(
        model,
        prompt,
        params,
        prompt_state="answer",
        parse_tools=False,
        thinking_budget=None,
        constraint=constraint,
    )
    return Prepared(model, prompt, params, sequence, constraint, "answer", False, False)
