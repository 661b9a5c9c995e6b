// The LoRA Land page. Plain JavaScript, no build step, nothing fetched from outside this endpoint.
// Answers come from our own public /v1 API (streamed completions, greedy); the page's data (tasks,
// examples, leaderboards, prompt checks, scores) from /web/api/ on the same endpoint.
"use strict";

const ROOT = new URL(".", document.baseURI);
const KEY_STORE = "loraland.apiKey"; // sessionStorage: this tab only; never put in a URL or logged
const state = { keyRequired: false, tasks: null, task: null, example: null, busy: false };

// ----------------------------------------------------------------------------- small helpers

function $(id) { return document.getElementById(id); }

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function number(value, signed) {
  if (value === null || value === undefined) return "—";
  return (signed && value > 0 ? "+" : "") + value.toFixed(3);
}

function showStatus(message) {
  $("status").textContent = message || "";
  $("status").hidden = !message;
}

class EndpointError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param || null;
  }
}

// What a person should read for a failed request: dead endpoint, busy server, refused key, or the API's message.
async function endpointError(response) {
  let message = response.statusText, param = null;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || message;
    param = body.error && body.error.param;
  } catch (ignored) { /* not JSON: keep the status text */ }
  if (response.status === 401) {
    askForKey("The API key was refused; enter it again.");
    return new EndpointError(401, "The API key was refused; enter it above.", param);
  }
  if (response.status === 429 || response.status === 503) {
    const retry = response.headers.get("Retry-After");
    return new EndpointError(response.status, `The server is busy (${response.status}): ${message}` +
      (retry ? ` Try again in ${retry} s.` : " Try again shortly."), param);
  }
  return new EndpointError(response.status, `Error ${response.status}: ${message}`, param);
}

function unreachable() {
  return new EndpointError(0, `The endpoint at ${ROOT.origin} does not answer: is \`loraland serve\` still running?`);
}

function headers() {
  const found = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) found.Authorization = `Bearer ${key}`;
  return found;
}

async function request(path, body) {
  let response;
  try {
    response = await fetch(new URL(path, ROOT), body === undefined ? { headers: headers() }
      : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (ignored) {
    throw unreachable();
  }
  if (!response.ok) throw await endpointError(response);
  return response;
}

async function getJSON(path, body) {
  return (await request(path, body)).json();
}

// ----------------------------------------------------------------------------- the API key

function askForKey(message) {
  $("key-form").hidden = false;
  if (message) showStatus(message);
  $("api-key").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("api-key").value);
  $("api-key").value = "";
  $("key-form").hidden = true;
  showStatus("");
  state.tasks = null;
  route();
});

// ----------------------------------------------------------------------------- the task list

async function showTaskList() {
  $("task-view").hidden = true;
  $("task-list-view").hidden = false;
  if (state.tasks === null) state.tasks = (await getJSON("web/api/tasks")).tasks;
  renderTaskList();
}

function taskMatches(task, words) {
  const text = [task.name, task.category, task.metric, task.description, ...task.base_models].join(" ").toLowerCase();
  return words.every((word) => text.includes(word));
}

function renderTaskList() {
  const words = $("filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  const groups = new Map();
  for (const task of state.tasks.filter((t) => taskMatches(t, words))) {
    if (!groups.has(task.category)) groups.set(task.category, []);
    groups.get(task.category).push(task);
  }
  const sections = [...groups].map(([category, tasks]) => el("section", { class: "group" },
    el("h2", {}, category.replace(/_/g, " ")),
    el("ul", { class: "tasks" }, tasks.map((task) => el("li", { "data-task": task.name },
      el("a", { href: `#/task/${encodeURIComponent(task.name)}` }, task.name),
      el("span", { class: "metric" }, task.metric),
      el("p", {}, task.description),
      el("p", { class: "facts" },
        `fine-tuned on ${task.base_models.join(", ")}; champion ${task.champion.base_model} ` +
        `scores ${number(task.champion.score)}, lift ${number(task.champion.lift, true)}`))))));
  const empty = state.tasks.length ? "No task matches the filter." : "No task has a served champion yet: run a sweep first.";
  $("task-groups").replaceChildren(...(sections.length ? sections : [el("p", {}, empty)]));
}

$("filter").addEventListener("input", renderTaskList);

// ----------------------------------------------------------------------------- a task

async function showTask(name) {
  $("task-list-view").hidden = true;
  $("task-view").hidden = false;
  if (!state.task || state.task.name !== name) {
    const task = await getJSON(`web/api/tasks/${encodeURIComponent(name)}`);
    state.task = task;
    state.example = null;
    renderTask(task);
    if (task.examples) await anotherExample();
    else showFormError(`No evaluation data to take an example from${task.data_error ? ` (${task.data_error})` : ""}; ` +
      "type your own input.");
  }
}

function renderTask(task) {
  $("task-name").textContent = task.name;
  $("task-description").textContent = task.description;
  $("task-facts").textContent = `Category ${task.category.replace(/_/g, " ")} · metric ${task.metric} · champion ` +
    `${task.champion.base_model} (${task.champion.adapter}), score ${number(task.champion.score)}, ` +
    `lift ${number(task.champion.lift, true)}`;
  $("task-template").textContent = task.template;
  $("fields").replaceChildren(...task.fields.map((field) => el("div", { class: "field" },
    el("label", { for: `field-${field.name}` }, field.name, field.kind === "json" ? " (JSON)" : ""),
    el("textarea", { id: `field-${field.name}`, name: field.name, rows: 3, "data-kind": field.kind }),
    el("p", { class: "error", id: `error-${field.name}`, role: "alert", hidden: true }))));
  for (const id of ["side-by-side", "compare-grid", "gold"]) $(id).hidden = true;
  showFormError("");
  renderLeaderboard(task);
}

function renderLeaderboard(task) {
  $("leaderboard").tBodies[0].replaceChildren(...task.leaderboard.map((row) => el("tr",
    { class: row.champion ? "champion" : null, "data-base": row.base_model },
    el("td", {}, row.base_model, row.champion ? el("span", { class: "badge" }, "champion") : null),
    el("td", {}, number(row.zero_shot)), el("td", {}, number(row.finetuned)), el("td", {}, number(row.lift, true)),
    el("td", {}, number(row.study_zero_shot)), el("td", {}, number(row.study_finetuned)),
    el("td", {}, number(row.gpt35)), el("td", {}, number(row.gpt4)),
    el("td", {}, row.run_url ? el("a", { href: row.run_url, target: "_blank", rel: "noopener" }, row.run_id.slice(0, 8))
      : el("code", { title: "tracking store without a web UI: open it with `loraland ui`" }, row.run_id || "—")))));
}

function fieldValues() {
  const values = {};
  for (const area of $("fields").querySelectorAll("textarea")) values[area.name] = area.value;
  return values;
}

async function anotherExample() {
  const example = await getJSON(`web/api/tasks/${encodeURIComponent(state.task.name)}/example`);
  state.example = example;
  for (const [name, text] of Object.entries(example.fields)) $(`field-${name}`).value = text;
  for (const id of ["side-by-side", "compare-grid", "gold"]) $(id).hidden = true;
  clearFieldErrors();
}

// The gold answer applies only while the fields are the example's own.
function currentGold() {
  const example = state.example;
  if (!example || example.gold === null) return null;
  const values = fieldValues();
  return Object.entries(example.fields).every(([name, text]) => values[name] === text) ? example.gold : null;
}

// ----------------------------------------------------------------------------- checks before sending

function showFormError(message) {
  $("form-error").textContent = message;
  $("form-error").hidden = !message;
}

function clearFieldErrors() {
  for (const node of $("fields").querySelectorAll(".error")) { node.textContent = ""; node.hidden = true; }
  showFormError("");
}

function fieldError(name, message) {
  const node = $(`error-${name}`);
  if (!node) return showFormError(message);
  node.textContent = message;
  node.hidden = false;
  $(`field-${name}`).focus();
}

// The prompt for the fields, once every field is filled and it fits each model's context; null if refused.
async function checkedPrompt(models) {
  clearFieldErrors();
  const values = fieldValues();
  const empty = Object.keys(values).find((name) => !values[name].trim());
  if (empty !== undefined) { fieldError(empty, `${empty}: fill in this field`); return null; }
  let checked;
  try {
    checked = await getJSON(`web/api/tasks/${encodeURIComponent(state.task.name)}/prompt`,
      { fields: values, models, max_tokens: state.task.max_tokens });
  } catch (error) {
    if (error.param && error.param.startsWith("fields.")) fieldError(error.param.slice(7), error.message.replace(/^Error \d+: /, ""));
    else showFormError(error.message);
    return null;
  }
  const tooLong = Object.entries(checked.checks).filter(([, check]) => check.fits === false);
  if (tooLong.length) {
    showFormError(tooLong.map(([model, check]) => `Too long for ${model}: the prompt is ${check.prompt_tokens} tokens, ` +
      `and with ${state.task.max_tokens} new tokens it exceeds the context of ${check.context}.`).join(" ") +
      " Shorten the input.");
    return null;
  }
  return checked.prompt;
}

// ----------------------------------------------------------------------------- answers

function answerCell(model, role) {
  const cell = el("article", { class: "cell", "data-model": model },
    el("h3", {}, role ? el("span", { class: "role" }, role) : null, el("code", {}, model)),
    el("p", { class: "timing" }, "waiting…"),
    el("pre", { class: "answer" }),
    el("p", { class: "score" }),
    el("p", { class: "error", role: "alert", hidden: true }));
  return cell;
}

function partOf(cell, name) { return cell.querySelector(`.${name}`); }

// Server-sent events of /v1/completions (OpenAI's chunk format) -> the cell, as they arrive.
async function streamInto(cell, model, prompt) {
  const started = performance.now();
  const response = await request("v1/completions", { model, prompt, max_tokens: state.task.max_tokens, temperature: 0,
    stream: true, stream_options: { include_usage: true } });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "", first = null, tokens = null, adapter = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      buffer = buffer.slice(end + 2);
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new EndpointError(500, `Failed midway: ${chunk.error.message}`);
      adapter = chunk.system_fingerprint || adapter;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices || []) {
        if (!choice.text) continue;
        if (first === null) first = performance.now();
        text += choice.text;
        partOf(cell, "answer").textContent = text;
      }
    }
  }
  // Over the whole request: several tokens often arrive in one network read, so a rate after the first token is noise.
  const seconds = (performance.now() - started) / 1000;
  const rate = tokens && seconds > 0 ? `${(tokens / seconds).toFixed(1)} tokens/s` : "— tokens/s";
  partOf(cell, "timing").textContent = `${adapter || ""} · first token ${first === null ? "—" : Math.round(first - started) + " ms"}` +
    ` · ${rate} · ${tokens ?? "?"} token${tokens === 1 ? "" : "s"}`;
  return text;
}

async function scoreInto(cell, text, gold) {
  if (gold === null || !state.task.scored) {
    partOf(cell, "score").textContent = state.task.scored ? "not scored: no gold answer for edited input" : "not scored here (code runs in the sandbox)";
    return;
  }
  const scored = await getJSON(`web/api/tasks/${encodeURIComponent(state.task.name)}/score`, { prediction: text, gold });
  partOf(cell, "score").textContent = `${scored.metric} ${number(scored.score)}`;
  cell.dataset.score = String(scored.score);
}

async function answer(cell, model, prompt, gold) {
  try {
    const text = await streamInto(cell, model, prompt);
    await scoreInto(cell, text, gold);
    cell.dataset.state = "done";
  } catch (error) {
    partOf(cell, "error").textContent = error.message;
    partOf(cell, "error").hidden = false;
    partOf(cell, "timing").textContent = "failed";
    cell.dataset.state = "failed";
  }
}

async function runModels(models, roles, container) {
  if (state.busy) return;
  state.busy = true;
  try {
    const prompt = await checkedPrompt(models);
    if (prompt === null) return;
    const gold = currentGold();
    $("gold-text").textContent = gold ?? "";
    $("gold").hidden = gold === null;
    const cells = models.map((model, index) => answerCell(model, roles[index]));
    container.replaceChildren(...cells);
    container.hidden = false;
    await Promise.all(models.map((model, index) => answer(cells[index], model, prompt, gold)));
  } finally {
    state.busy = false;
    container.dataset.done = String(Date.now()); // the run is over: answered, failed or refused
  }
}

$("run-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const champion = state.task.champion;
  $("compare-grid").hidden = true;
  runModels([champion.model, champion.base_model], ["fine-tuned champion", "base model"], $("side-by-side"));
});

$("compare").addEventListener("click", () => {
  $("side-by-side").hidden = true;
  runModels(state.task.models, state.task.models.map((m) => (m.includes(":") ? "fine-tuned" : "base")), $("compare-grid"));
});

$("another").addEventListener("click", () => anotherExample().catch((error) => showFormError(error.message)));

// ----------------------------------------------------------------------------- routing

async function route() {
  showStatus("");
  const match = location.hash.match(/^#\/task\/(.+)$/);
  try {
    if (match) await showTask(decodeURIComponent(match[1]));
    else await showTaskList();
    document.body.dataset.ready = "true";
  } catch (error) {
    if (error.status !== 401) showStatus(error.message);
  }
}

async function start() {
  try {
    state.keyRequired = (await getJSON("web/api/settings")).api_key_required;
  } catch (error) {
    showStatus(error.message);
    return;
  }
  if (state.keyRequired && !sessionStorage.getItem(KEY_STORE)) askForKey("");
  else route();
}

window.addEventListener("hashchange", route);
start();
