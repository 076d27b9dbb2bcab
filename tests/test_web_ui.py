"""The chat page at `/` (server/ui.py, server/ui/), driven in headless Chromium with selenium
against a real server on the demo model, started with --api-key (the page asks for the key).

Needs Debian's `chromium` and `chromium-driver` (.ci/run installs them); without them the tests
skip, except under CI (the CI variable set), where they fail. QWEN3_MLX_UI_SCREENSHOT=PATH saves a
screenshot of a reply with its thinking open (docs/web-ui.png).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import httpx
import pytest

from tests.server_process import ServerProcess, wait_for

KEY = "sesame-web-ui"
EOS_IDS = ("151643", "151645")  # <|endoftext|>, <|im_end|>: banned, the demo rambles on

# Every state change of the last reply: whether its thinking was shown open, and the answer so
# far (a stream shows the answer growing; a whole reply shows it once). Request bodies too. With
# `window.pace` set, the reply's server-sent events reach the page one each 30 ms: a fast server's
# events would otherwise share a frame, and the states between them would never be drawn.
RECORDER = """
window.seen = []; window.bodies = []; window.pace = false;
const fetch0 = window.fetch;
window.fetch = async (url, init) => {
  if (init && init.body) window.bodies.push(JSON.parse(init.body));
  const response = await fetch0(url, init);
  if (!window.pace || !response.body) return response;
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const encoder = new TextEncoder();
  let buffer = '';
  const paced = new ReadableStream({
    async pull(out) {
      for (;;) {
        const cut = buffer.indexOf('\\n\\n');
        if (cut >= 0) {
          out.enqueue(encoder.encode(buffer.slice(0, cut + 2)));
          buffer = buffer.slice(cut + 2);
          return new Promise((resolve) => setTimeout(resolve, 30));
        }
        const {value, done} = await reader.read();
        if (done) { if (buffer) out.enqueue(encoder.encode(buffer)); return out.close(); }
        buffer += value;
      }
    },
    cancel: (reason) => reader.cancel(reason),
  });
  return new Response(paced, {status: response.status, headers: response.headers});
};
new MutationObserver(() => {
  const replies = document.querySelectorAll('#messages article.assistant');
  const last = replies[replies.length - 1];
  if (!last) return;
  const thinking = last.querySelector('.thinking');
  seen.push({shown: !thinking.hidden, open: thinking.open,
             answer: last.querySelector('.content').textContent});
}).observe(document.getElementById('messages'),
           {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI: .ci/run installs chromium and its driver)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _unavailable(
            "chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1100,720")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(demo_model_dir):
    server = ServerProcess(["--model", str(demo_model_dir), "--max-concurrency", "2"], api_key=KEY)
    yield server
    server.stop()


def engine_stats(server) -> dict:
    return httpx.get(server.base + "/health", headers=server.headers(), timeout=5).json()


def by_css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def until(condition, timeout=20.0, what="the page"):
    assert wait_for(condition, timeout=timeout, every=0.02), f"timed out waiting for {what}"


def fresh_page(driver, server, key=KEY):
    """The page on empty storage (with `key` stored), models listed, the recorder installed."""
    driver.get(server.base + "/")
    driver.execute_script(
        "localStorage.clear(); if (arguments[0]) localStorage.setItem('qwen3-mlx.api-key', arguments[0]);",
        key,
    )
    driver.refresh()
    if key:
        until(lambda: by_css(driver, "#model option"), what="the model list")
        driver.execute_script(RECORDER)


def send(driver, text):
    from selenium.webdriver.common.keys import Keys

    count = len(by_css(driver, "article.assistant"))
    by_css(driver, "#input")[0].send_keys(text, Keys.ENTER)
    until(lambda: len(by_css(driver, "article.assistant")) > count, what="the reply to start")
    return by_css(driver, "article.assistant")[-1]


def finished(driver, reply, state="done"):
    until(lambda: reply.get_attribute("data-state") != "streaming", what="the reply to end")
    assert reply.get_attribute("data-state") == state, reply.text
    return reply


def answer(reply) -> str:
    return reply.find_element("css selector", ".content").text


def fill(driver, selector, text):
    field = by_css(driver, selector)[0]
    field.clear()
    field.send_keys(text)


def settings(driver, **fields):
    """Open the settings panel and set its fields (by element id, `_` for `-`)."""
    panel = by_css(driver, "#settings")[0]
    if not panel.get_attribute("open"):
        by_css(driver, "#settings summary")[0].click()
    for name, text in fields.items():
        fill(driver, "#" + name.replace("_", "-"), text)
    by_css(driver, "#settings summary")[0].click()


def test_the_page_and_its_files_need_no_key_but_the_api_does(server):
    for path in ("/", "/ui/app.js", "/ui/markdown.js", "/ui/style.css"):
        response = httpx.get(server.base + path, timeout=5)
        assert response.status_code == 200, path
        assert "default-src 'self'" in response.headers["content-security-policy"]
    # Only those: any other path, under /ui/ too, needs the key.
    for path in ("/ui/other.js", "/v1/models", "/openapi.json"):
        assert httpx.get(server.base + path, timeout=5).status_code == 401, path
    headers = server.headers()
    assert httpx.get(server.base + "/ui/other.js", headers=headers, timeout=5).status_code == 404


def test_the_page_asks_for_the_key_once_and_then_works(browser, server, demo_conversations):
    fresh_page(browser, server, key=None)
    dialog = by_css(browser, "#key-dialog")[0]
    until(dialog.is_displayed, what="the key dialog")
    assert not by_css(browser, "#key-wrong")[0].is_displayed()
    fill(browser, "#key-input", "wrong-key")
    by_css(browser, "#key-ok")[0].click()
    until(lambda: by_css(browser, "#key-wrong")[0].is_displayed(), what="the key refused")
    fill(browser, "#key-input", KEY)
    by_css(browser, "#key-ok")[0].click()
    until(lambda: by_css(browser, "#model option"), what="the model list")
    assert not dialog.is_displayed()
    # Stored: a reload asks no more, and the key goes with the chat request.
    browser.refresh()
    until(lambda: by_css(browser, "#model option"), what="the model list")
    assert not by_css(browser, "#key-dialog")[0].is_displayed()
    reply = finished(browser, send(browser, "Hello"))
    assert answer(reply) == demo_conversations["hello"]["content"]


def test_thinking_streams_apart_and_folds_when_the_answer_starts(
    browser, server, demo_conversations
):
    record = demo_conversations["capital"]
    fresh_page(browser, server)
    browser.execute_script("window.pace = true")
    reply = finished(browser, send(browser, record["messages"][-1]["content"]))
    (body,) = browser.execute_script("return window.bodies")
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["enable_thinking"] is True and "thinking_budget" not in body
    thinking = reply.find_element("css selector", ".thinking")
    assert thinking.is_displayed() and thinking.get_attribute("open") is None
    assert answer(reply) == record["content"]
    seen = browser.execute_script("return window.seen")
    # Open while the model thought, the answer then streamed in pieces.
    assert any(s["shown"] and s["open"] and s["answer"] == "" for s in seen)
    answers = [s["answer"] for s in seen]
    assert len(set(answers)) > 3 and answers[-1] == record["content"]
    assert any(a and "Paris" not in a for a in answers)  # Paris came after the answer began
    stats = reply.find_element("css selector", ".stats").text
    assert re.fullmatch(r"TTFT [\d.]+ s · \d+ tokens · \d+ thinking · [\d.]+ tok/s", stats), stats
    reply.find_element("css selector", ".thinking summary").click()
    text = reply.find_element("css selector", ".thinking-text")
    until(text.is_displayed, what="the thinking to open")
    assert text.text == record["reasoning"]
    if os.environ.get("QWEN3_MLX_UI_SCREENSHOT"):
        browser.save_screenshot(os.environ["QWEN3_MLX_UI_SCREENSHOT"])


def test_thinking_off_and_a_thinking_budget(browser, server, demo_conversations):
    record = demo_conversations["capital.thinking_off"]
    fresh_page(browser, server)
    by_css(browser, "#thinking")[0].click()
    assert not by_css(browser, "#budget")[0].is_enabled()
    reply = finished(browser, send(browser, record["messages"][-1]["content"]))
    assert browser.execute_script("return window.bodies")[-1]["enable_thinking"] is False
    assert not reply.find_element("css selector", ".thinking").is_displayed()
    assert not any(s["shown"] for s in browser.execute_script("return window.seen"))
    assert answer(reply) == record["content"]
    # Thinking on again, with a budget of 3 tokens: the request says so, the thinking is cut.
    by_css(browser, "#new-chat")[0].click()
    by_css(browser, "#thinking")[0].click()
    fill(browser, "#budget", "3")
    reply = finished(browser, send(browser, record["messages"][-1]["content"]))
    body = browser.execute_script("return window.bodies")[-1]
    assert body["enable_thinking"] is True and body["thinking_budget"] == 3
    reasoning = browser.execute_script(
        "return arguments[0].querySelector('.thinking-text').textContent", reply
    )
    full = demo_conversations["capital"]["reasoning"]
    assert reasoning and len(reasoning) < len(full) and full.startswith(reasoning.strip())


def test_stop_aborts_a_long_reply(browser, server, demo_conversations):
    fresh_page(browser, server)
    by_css(browser, "#thinking")[0].click()
    banned = json.dumps({"logit_bias": dict.fromkeys(EOS_IDS, -100)})
    settings(browser, max_tokens="3000", extra=banned)
    before = engine_stats(server)["cancelled"]
    reply = send(browser, "Hello")
    until(lambda: int(reply.get_attribute("data-deltas") or 0) >= 20, what="a long reply")
    assert reply.get_attribute("data-state") == "streaming"
    by_css(browser, "#stop")[0].click()
    until(lambda: reply.get_attribute("data-state") == "stopped", timeout=3, what="the stop")
    send_button, stop_button = by_css(browser, "#send")[0], by_css(browser, "#stop")[0]
    assert send_button.is_displayed() and not stop_button.is_displayed()
    assert reply.find_element("css selector", ".stats").text.endswith("· stopped")
    text = answer(reply)
    deltas = int(reply.get_attribute("data-deltas"))
    assert deltas < 2000
    # The server saw the client go and cancelled the request; the page shows nothing more.
    assert wait_for(lambda: engine_stats(server)["cancelled"] == before + 1, timeout=5)
    assert engine_stats(server)["running"] == 0
    time.sleep(0.3)
    assert answer(reply) == text
    # Ready again: a new conversation gets its whole answer.
    settings(browser, extra=" ")
    by_css(browser, "#new-chat")[0].click()
    reply = finished(browser, send(browser, "What is 17 + 25?"))
    assert answer(reply) == demo_conversations["arithmetic.thinking_off"]["content"]


def test_tool_calls_inline_and_a_tool_result_continues(browser, server, demo_conversations):
    record = demo_conversations["tool_call"]
    fresh_page(browser, server)
    settings(browser, extra=json.dumps({"tools": record["tools"]}))
    reply = finished(browser, send(browser, record["messages"][-1]["content"]))
    call = reply.find_element("css selector", ".tool-call")
    assert call.find_element("css selector", ".tool-label").text == "Tool call: get_weather"
    arguments = call.find_element("css selector", ".tool-arguments").text
    assert json.loads(arguments) == record["tool_calls"][0]["arguments"]
    # The place a tool's result goes (MCP, to come): shown under its call, sent back after it.
    result = demo_conversations["tool_result"]["messages"][-1]["content"]
    browser.execute_script(
        "window.qwenChat.addToolResult(arguments[0], arguments[1])",
        call.get_attribute("data-call-id"),
        result,
    )
    until(lambda: by_css(browser, ".tool-result pre"), what="the tool result")
    assert by_css(browser, ".tool-result pre")[0].text == result
    browser.execute_script("window.qwenChat.respond()")
    until(lambda: len(by_css(browser, "article.assistant")) == 2, what="the next reply")
    reply = finished(browser, by_css(browser, "article.assistant")[-1])
    messages = browser.execute_script("return window.bodies")[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert answer(reply) == demo_conversations["tool_result"]["content"]


def test_conversations_are_kept_with_new_and_delete(browser, server, demo_conversations):
    fresh_page(browser, server)
    finished(browser, send(browser, "Hello"))
    by_css(browser, "#new-chat")[0].click()
    assert by_css(browser, "#messages .hint")
    finished(browser, send(browser, "Name the three primary colors."))
    browser.refresh()
    until(lambda: by_css(browser, "#model option"), what="the model list")
    titles = [b.text for b in by_css(browser, "#conversations button")]
    assert titles == ["Name the three primary colors.", "Hello"]
    content = by_css(browser, "article.assistant .content")
    assert [c.text for c in content] == [demo_conversations["colors"]["content"]]
    assert by_css(browser, "article.assistant .stats")[0].text.startswith("TTFT")
    by_css(browser, "#conversations button")[1].click()
    assert by_css(browser, "article.user")[0].text == "Hello"
    by_css(browser, "#delete-chat")[0].click()
    assert [b.text for b in by_css(browser, "#conversations button")] == titles[:1]
    stored = browser.execute_script("return JSON.parse(localStorage.getItem('qwen3-mlx.chats'))")
    assert [c["title"] for c in stored] == titles[:1]


def test_markdown_is_rendered_and_html_in_replies_is_escaped(browser, server):
    fresh_page(browser, server)
    html = browser.execute_script(
        "return window.renderMarkdown(arguments[0])",
        "Some **bold**, *italic* and `a<b`.\n\n- one\n- two\n\n```python\nx = '<script>'\n```\n"
        "<img src=x onerror=alert(1)>",
    )
    assert html == (
        "<p>Some <strong>bold</strong>, <em>italic</em> and <code>a&lt;b</code>.</p>"
        "<ul><li>one</li><li>two</li></ul>"
        '<pre data-lang="python"><code>x = &#39;&lt;script&gt;&#39;</code></pre>'
        "<p>&lt;img src=x onerror=alert(1)&gt;</p>"
    )


def test_no_ui_turns_the_page_off(tmp_path):
    server = ServerProcess(["--no-ui", "--models-dir", str(tmp_path), "--no-warmup"])
    try:
        for path in ("/", "/ui/app.js"):
            response = httpx.get(server.base + path, timeout=5)
            assert response.status_code == 404, path
            assert response.json()["error"]["message"] == f"no such endpoint: GET {path}"
    finally:
        server.stop()
