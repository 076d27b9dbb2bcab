"""Stored responses of the Responses API on a real server, through the openai SDK: a chain of
three turns by `previous_response_id` replies as the whole conversation sent to chat does, the
third turn's prompt is read from the prefix cache, GET returns what POST did, DELETE and
`store: false` leave nothing to chain from."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

GREEDY = {"temperature": 0}
TURNS = ["Hello", "What is the capital of Japan?", "What is the capital of France?"]


@pytest.fixture(scope="module")
def client(demo_server):
    return OpenAI(base_url=demo_server.v1, api_key="lm-studio", max_retries=0, timeout=120)


def chat_reply(client, messages) -> str:
    """The same conversation through chat completions (the reference: one source of truth)."""
    reply = client.chat.completions.create(model="demo", messages=messages, **GREEDY)
    return reply.choices[0].message.content


def test_a_chain_of_three_turns_is_the_whole_conversation(client):
    messages, previous, responses = [], None, []
    for turn in TURNS:
        response = client.responses.create(
            model="demo", input=turn, previous_response_id=previous, **GREEDY
        )
        messages.append({"role": "user", "content": turn})
        assert response.output_text == chat_reply(client, messages), turn
        assert response.previous_response_id == previous and response.store is True
        messages.append({"role": "assistant", "content": response.output_text})
        previous = response.id
        responses.append(response)
    # Each turn's prompt begins with the one before it: the prefix cache holds it.
    third = responses[-1].usage
    assert third.input_tokens_details.cached_tokens >= responses[1].usage.input_tokens // 2
    assert client.responses.retrieve(responses[1].id).model_dump() == responses[1].model_dump()


def test_a_streamed_response_is_stored_and_chains(client):
    with client.responses.stream(model="demo", input=TURNS[0], **GREEDY) as stream:
        for _ in stream:
            pass
        first = stream.get_final_response()
    stored = client.responses.retrieve(first.id)
    assert stored.output_text == first.output_text and stored.status == "completed"
    second = client.responses.create(
        model="demo", input=TURNS[1], previous_response_id=first.id, **GREEDY
    )
    expected = chat_reply(
        client,
        [
            {"role": "user", "content": TURNS[0]},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": TURNS[1]},
        ],
    )
    assert second.output_text == expected


def test_deleted_and_unstored_responses_are_gone(client):
    kept = client.responses.create(model="demo", input=TURNS[0], max_output_tokens=8)
    deleted = client.responses.delete(kept.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(kept.id)
    unstored = client.responses.create(
        model="demo", input=TURNS[0], max_output_tokens=8, store=False
    )
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="demo", input="and?", previous_response_id=unstored.id)
    assert error.value.body["param"] == "previous_response_id"
