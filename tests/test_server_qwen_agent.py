"""Qwen-Agent's `Assistant` against our `/v1`, as Qwen3's published example runs it (api key lm-studio).

Default mode: Qwen-Agent writes the tool descriptions into the system prompt itself and parses
`<tool_call>` from the content (the server must leave it there). `use_raw_api=True`: it sends
`tools` and reads OpenAI `tool_calls` from the stream. In both, the tool must actually be called
and the model's answer to its result must come back.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("qwen_agent", reason="pip install qwen-agent soundfile python-dateutil")


@pytest.fixture(scope="module")
def weather(demo_conversations):
    call = demo_conversations["tool_call"]
    result = demo_conversations["tool_result"]
    tool_message = next(m for m in result["messages"] if m["role"] == "tool")
    return {
        "tool": call["tools"][0]["function"],
        "question": call["messages"][-1]["content"],
        "result": tool_message["content"],
        "arguments": call["tool_calls"][0]["arguments"],
        "answer": result["content"],
    }


def run_assistant(server, weather, raw: bool):
    from qwen_agent.agents import Assistant
    from qwen_agent.tools.base import BaseTool, register_tool

    calls = []

    @register_tool(weather["tool"]["name"], allow_overwrite=True)
    class GetWeather(BaseTool):
        description = weather["tool"]["description"]
        parameters = weather["tool"]["parameters"]

        def call(self, params, **kwargs):
            calls.append(json.loads(params) if isinstance(params, str) else params)
            return weather["result"]

    generate_cfg = {"temperature": 0}
    if raw:
        generate_cfg["use_raw_api"] = True
    llm = {
        "model": "qwen3-32b-mlx",
        "model_server": server.v1,
        "api_key": "lm-studio",
        "generate_cfg": generate_cfg,
    }
    bot = Assistant(llm=llm, function_list=[weather["tool"]["name"]])
    *_, responses = bot.run(messages=[{"role": "user", "content": weather["question"]}])
    return calls, responses


@pytest.mark.parametrize("raw", [False, True], ids=["prompt-based", "use_raw_api"])
def test_qwen_agent_calls_the_tool(demo_server, weather, raw):
    calls, responses = run_assistant(demo_server, weather, raw)
    assert calls == [weather["arguments"]]
    function_calls = [m for m in responses if m.get("function_call")]
    assert function_calls and function_calls[0]["function_call"]["name"] == weather["tool"]["name"]
    assert responses[-1]["role"] == "assistant"
    assert responses[-1]["content"] == weather["answer"]
