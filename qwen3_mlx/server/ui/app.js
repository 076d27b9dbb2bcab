"use strict";
// The chat page: this server's own /v1 API, called from the browser. Conversations and settings
// live in localStorage; one reply streams at a time.

const $ = (id) => document.getElementById(id);
const STORE = { chats: "qwen3-mlx.chats", settings: "qwen3-mlx.settings", key: "qwen3-mlx.api-key" };
const FIELDS = ["thinking", "budget", "max-tokens", "temperature", "system", "extra"];
const prop = (id) => (id === "thinking" ? "checked" : "value");

const read = (name, fallback) => {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback;
  }
};
let chats = read(STORE.chats, []); // the latest first
const settings = read(STORE.settings, {});
let current = chats.find((c) => c.id === settings.current) ?? null;
// A reply saved while it streamed (the page was closed) streams no more.
for (const m of chats.flatMap((c) => c.messages)) if (m.state === "streaming") m.state = "stopped";
let inFlight = null; // the AbortController of the reply streaming now

function element(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

const status = (text) => ($("status").textContent = text);

function persist() {
  try {
    localStorage.setItem(STORE.chats, JSON.stringify(chats));
  } catch (e) {
    status(`conversations not saved (${e.message}): delete some`);
  }
}

function saveSettings() {
  for (const id of FIELDS) settings[id] = $(id)[prop(id)];
  settings.model = $("model").value || settings.model;
  settings.current = current?.id;
  localStorage.setItem(STORE.settings, JSON.stringify(settings));
}

// -- the API, with the key of a server started with --api-key ----------------------------------

let asking = null;
function askForKey(refused) {
  // Requests refused together (the model list and a reply) share one question.
  asking ??= new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-wrong").hidden = !refused;
    $("key-input").value = "";
    dialog.returnValue = "";
    dialog.addEventListener(
      "close",
      () => {
        asking = null;
        const key = $("key-input").value.trim();
        const ok = dialog.returnValue === "ok" && key !== "";
        if (ok) localStorage.setItem(STORE.key, key);
        resolve(ok);
      },
      { once: true },
    );
    dialog.showModal();
  });
  return asking;
}

async function api(path, init = {}) {
  for (;;) {
    const key = localStorage.getItem(STORE.key);
    const headers = { ...init.headers };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401 || !(await askForKey(Boolean(key)))) return response;
  }
}

async function errorOf(response) {
  const text = await response.text();
  try {
    return JSON.parse(text).error?.message ?? text;
  } catch {
    return text || `HTTP ${response.status}`;
  }
}

// Server-sent events: `data: <json>` blocks, the last `data: [DONE]`.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const lines = block.split(/\r?\n/).filter((l) => l.startsWith("data:"));
      const data = lines.map((l) => l.slice(5).trim()).join("\n");
      if (data && data !== "[DONE]") yield JSON.parse(data);
    }
  }
}

async function loadModels() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) return status(`models: ${await errorOf(response)}`);
    const ids = (await response.json()).data.map((m) => m.id);
    $("model").replaceChildren(...ids.map((id) => new Option(id, id)));
    const wanted = current?.model ?? settings.model;
    if (ids.includes(wanted)) $("model").value = wanted;
    status(ids.length ? "" : "this server lists no model");
  } catch (e) {
    status(`models: ${e.message}`);
  }
}

// -- the request -----------------------------------------------------------------------------

function extraFields() {
  const text = $("extra").value.trim();
  if (!text) return {};
  let fields;
  try {
    fields = JSON.parse(text);
  } catch (e) {
    throw new Error(`More request fields: not JSON (${e.message})`);
  }
  if (fields === null || typeof fields !== "object" || Array.isArray(fields)) {
    throw new Error("More request fields: must be a JSON object");
  }
  return fields;
}

function apiMessages(chat) {
  const out = [];
  const system = $("system").value.trim();
  if (system) out.push({ role: "system", content: system });
  for (const m of chat.messages) {
    if (m.role === "user") {
      out.push({ role: "user", content: m.content });
      continue;
    }
    if (m.state === "error" && !m.content) continue;
    // Qwen's template keeps the thinking of the turns since the last user message only.
    const message = { role: "assistant", content: m.content };
    if (m.reasoning) message.reasoning_content = m.reasoning;
    const calls = m.state === "done" ? m.tool_calls.filter(Boolean) : [];
    if (calls.length) {
      message.tool_calls = calls.map((c) => ({
        id: c.id,
        type: "function",
        function: { name: c.name, arguments: c.arguments },
      }));
    }
    out.push(message);
    for (const r of m.tool_results) {
      out.push({ role: "tool", tool_call_id: r.tool_call_id, content: r.content });
    }
  }
  return out;
}

function requestBody(chat) {
  const thinking = $("thinking").checked;
  const body = {
    model: $("model").value,
    messages: apiMessages(chat),
    stream: true,
    stream_options: { include_usage: true },
    enable_thinking: thinking,
  };
  const [budget, maxTokens, temperature] = ["budget", "max-tokens", "temperature"].map((id) => $(id).value);
  if (thinking && budget !== "") body.thinking_budget = Number(budget);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  if (temperature !== "") body.temperature = Number(temperature);
  return Object.assign(body, extraFields());
}

// One streamed choice's delta into the reply; whether it carried any text.
function apply(reply, choice) {
  const d = choice.delta ?? {};
  let grew = false;
  if (d.reasoning_content) {
    reply.reasoning += d.reasoning_content;
    grew = true;
  }
  if (d.content) {
    reply.content += d.content;
    grew = true;
  }
  for (const t of d.tool_calls ?? []) {
    const call = (reply.tool_calls[t.index ?? 0] ??= { id: "", name: "", arguments: "" });
    call.id ||= t.id ?? "";
    call.name ||= t.function?.name ?? "";
    call.arguments += t.function?.arguments ?? "";
    grew = true;
  }
  if (choice.finish_reason) reply.finish = choice.finish_reason;
  if (grew) reply.deltas++;
  return grew;
}

// Streams the assistant's reply to the current conversation as it stands.
async function respond() {
  const chat = current;
  const body = requestBody(chat);
  const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [], tool_results: [],
    state: "streaming", deltas: 0 };
  chat.messages.push(reply);
  const view = replyView(reply);
  $("messages").append(view.element);
  view.update();
  const controller = (inFlight = new AbortController());
  setBusy(true);
  const start = performance.now();
  let first = null;
  try {
    const init = {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    };
    const response = await api("/v1/chat/completions", init);
    if (!response.ok) throw new Error(await errorOf(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message ?? JSON.stringify(chunk.error));
      if (chunk.usage) reply.usage = chunk.usage;
      for (const choice of chunk.choices ?? []) if (apply(reply, choice)) first ??= performance.now();
      view.schedule();
    }
    reply.state = "done";
  } catch (e) {
    reply.state = e.name === "AbortError" ? "stopped" : "error";
    if (reply.state === "error") reply.error = e.message;
  } finally {
    const end = performance.now();
    reply.timing = first === null ? null : { ttft: (first - start) / 1000, seconds: (end - first) / 1000 };
    inFlight = null;
    setBusy(false);
    persist();
    view.update();
  }
}

async function send() {
  const text = $("input").value.trim();
  if (!text || inFlight) return;
  try {
    extraFields();
  } catch (e) {
    return status(e.message);
  }
  status("");
  if (!current) {
    const id = Date.now().toString(36) + Math.random().toString(36).slice(2);
    current = { id, title: text.slice(0, 60), messages: [] };
  }
  current.model = $("model").value;
  current.messages.push({ role: "user", content: text });
  chats = [current, ...chats.filter((c) => c !== current)];
  $("input").value = "";
  persist();
  saveSettings();
  renderList();
  renderChat();
  await respond();
}

// For tools run by the page (MCP, to come): a result joins the reply that called for it, and
// `respond()` then lets the model go on from it.
function addToolResult(callId, content) {
  const calls = (m) => m.role === "assistant" && m.tool_calls.some((c) => c?.id === callId);
  const reply = current?.messages.find(calls);
  if (!reply) throw new Error(`no tool call ${callId} in this conversation`);
  const text = typeof content === "string" ? content : JSON.stringify(content);
  reply.tool_results.push({ tool_call_id: callId, content: text });
  persist();
  renderChat();
}
window.qwenChat = { addToolResult, respond: () => (inFlight || !current ? null : respond()) };

// -- views -----------------------------------------------------------------------------------

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("side").disabled = busy;
  $("delete-chat").disabled = busy || !current;
}

const pretty = (text) => {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
};

function toolResultView(result) {
  const e = element("div", "tool-result");
  e.append(element("div", "tool-label", "Result"), element("pre", "", result.content));
  return e;
}

function toolCallView(call, reply) {
  const e = element("div", "tool-call");
  e.dataset.callId = call.id;
  e.append(
    element("div", "tool-label", `Tool call: ${call.name}`),
    element("pre", "tool-arguments", pretty(call.arguments)),
  );
  for (const r of reply.tool_results) if (r.tool_call_id === call.id) e.append(toolResultView(r));
  return e;
}

function statsText(reply) {
  const parts = [];
  const tokens = reply.usage?.completion_tokens ?? reply.deltas;
  const t = reply.timing;
  if (t) parts.push(`TTFT ${t.ttft.toFixed(2)} s`);
  if (tokens) parts.push(`${reply.usage ? "" : "~"}${tokens} tokens`);
  const thought = reply.usage?.completion_tokens_details?.reasoning_tokens;
  if (thought) parts.push(`${thought} thinking`);
  if (t && tokens > 1 && t.seconds > 0) parts.push(`${((tokens - 1) / t.seconds).toFixed(1)} tok/s`);
  if (reply.finish === "length") parts.push("max tokens reached");
  if (reply.state === "stopped") parts.push("stopped");
  return parts.join(" · ");
}

function replyView(reply) {
  const el = element("article", "message assistant");
  const thinking = element("details", "thinking");
  const summary = element("summary");
  const thought = element("div", "thinking-text");
  thinking.append(summary, thought);
  const content = element("div", "content markdown");
  const tools = element("div", "tools");
  const error = element("div", "error");
  const stats = element("footer", "stats");
  el.append(thinking, content, tools, error, stats);
  let frame = 0;
  let folded = false; // folded once, when the answer starts: the user may open it again
  const view = {
    element: el,
    schedule: () => (frame ||= requestAnimationFrame(view.update)),
    update() {
      frame = 0;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 60;
      const answering = reply.content || reply.tool_calls.length || reply.state !== "streaming";
      thinking.hidden = !reply.reasoning;
      thought.textContent = reply.reasoning;
      summary.textContent = answering ? "Thinking" : "Thinking…";
      if (!folded) {
        thinking.open = !answering;
        folded = Boolean(answering);
      }
      content.innerHTML = window.renderMarkdown(reply.content);
      tools.replaceChildren(...reply.tool_calls.filter(Boolean).map((c) => toolCallView(c, reply)));
      error.hidden = !reply.error;
      error.textContent = reply.error ?? "";
      stats.textContent = statsText(reply);
      el.dataset.state = reply.state;
      el.dataset.deltas = reply.deltas;
      if (atBottom) box.scrollTop = box.scrollHeight;
    },
  };
  return view;
}

function renderChat() {
  const box = $("messages");
  box.replaceChildren();
  if (!current) box.append(element("p", "hint", "Ask something to start a conversation."));
  for (const m of current?.messages ?? []) {
    if (m.role === "user") box.append(element("article", "message user", m.content));
    else {
      const view = replyView(m);
      view.update();
      box.append(view.element);
    }
  }
  box.scrollTop = box.scrollHeight;
}

function renderList() {
  const items = chats.map((chat) => {
    const button = element("button", "", chat.title);
    button.type = "button";
    button.title = chat.title;
    if (chat === current) button.setAttribute("aria-current", "true");
    button.onclick = () => openChat(chat);
    const li = element("li");
    li.append(button);
    return li;
  });
  $("conversations").replaceChildren(...items);
  $("delete-chat").disabled = !current;
}

function openChat(chat) {
  current = chat;
  if (chat && [...$("model").options].some((o) => o.value === chat.model)) $("model").value = chat.model;
  saveSettings();
  renderList();
  renderChat();
  $("input").focus();
}

// -- start -----------------------------------------------------------------------------------

for (const id of FIELDS) if (settings[id] !== undefined) $(id)[prop(id)] = settings[id];
const syncBudget = () => ($("budget").disabled = !$("thinking").checked);
syncBudget();
$("thinking").addEventListener("change", syncBudget);
for (const id of [...FIELDS, "model"]) $(id).addEventListener("change", saveSettings);
$("new-chat").onclick = () => openChat(null);
$("delete-chat").onclick = () => {
  chats = chats.filter((c) => c !== current);
  persist();
  openChat(chats[0] ?? null);
};
$("stop").onclick = () => inFlight?.abort();
$("composer").onsubmit = (e) => {
  e.preventDefault();
  send();
};
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
renderList();
renderChat();
loadModels();
