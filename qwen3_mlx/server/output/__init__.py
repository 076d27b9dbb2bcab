"""Engine events → each API's replies, built from the typed schemas of `protocol`.

The engine sends one `Output` per decode step (a `generation.SequenceOutput`: text, reasoning,
content and tool-call deltas, logprobs) and one `Finished` per row; here those become what the
clients expect, one module per API:

    common       SSE framing, dumping, the finish reason, usage, token texts, reasoning format
    chat         /v1/chat/completions: whole replies and chunks, `n` choices
    completions  /v1/completions: whole replies and chunks, several prompts and `n`, echo
    responses    /v1/responses: the result object and its streaming events
    anthropic    /v1/messages (Anthropic's Messages API): the message, its events, its errors
    ollama       Ollama's /api/chat and /api/generate records (JSON lines), its model listings
    lmstudio     what /api/v0 adds: stats, model_info, runtime, model cards
    scores       model calls replies need (engine thread): embeddings, an echoed prompt's logprobs
"""
