// The chat page: a plain client of liveloop's OpenAI-compatible API (no build step, no dependencies).
// Answers stream from POST /v1/chat/completions; each answer's thumbs go to POST /v1/feedback with its completion id.

const KEY_STORAGE = "liveloop.apiKey";

const keyInput = document.querySelector("#api-key");
const conversation = document.querySelector("#conversation");
const composer = document.querySelector("#composer");
const prompt = document.querySelector("#prompt");
const sendButton = document.querySelector("#send");
const errorBanner = document.querySelector("#error");
const answerTemplate = document.querySelector("#answer-template");

// The whole conversation is sent with every request: the API is stateless.
let messages = [];
let alias = null; // the model name to ask for, learnt from the server with the current key

class APIError extends Error {}

function headers() {
  const key = keyInput.value.trim();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

function describe(status, body) {
  // liveloop answers errors in OpenAI's shape: {"error": {"message", "type", "code", "param"}}
  const error = body && body.error;
  return error ? `${error.message} (${status ? `${status} ` : ""}${error.type})` : `HTTP ${status}`;
}

async function call(path, init) {
  const response = await fetch(path, { ...init, headers: headers() });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new APIError(describe(response.status, body));
  }
  return response;
}

function showError(message) {
  errorBanner.textContent = message;
  errorBanner.hidden = !message;
}

function addMessage(role, text) {
  const element = document.createElement("article");
  element.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  element.append(body);
  conversation.append(element);
  return element;
}

// The alias the server lists first always means its live version (or a canary, for users in the canary slice).
async function liveAlias() {
  if (alias === null) {
    const models = await (await call("/v1/models", { method: "GET" })).json();
    alias = models.data[0].id;
  }
  return alias;
}

// Yields each parsed `data:` payload of a server-sent event stream until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function streamAnswer(answer) {
  const text = answer.querySelector(".text");
  const body = JSON.stringify({ model: await liveAlias(), messages, stream: true });
  const response = await call("/v1/chat/completions", { method: "POST", body });
  for await (const chunk of events(response)) {
    if (chunk.error) throw new APIError(describe(null, chunk)); // an error after the stream began
    answer.dataset.completionId = chunk.id;
    answer.querySelector(".model").textContent = `answered by ${chunk.model}`;
    text.textContent += chunk.choices[0]?.delta?.content ?? "";
  }
  return text.textContent;
}

async function send(content) {
  showError("");
  messages.push({ role: "user", content });
  const question = addMessage("user", content);
  const answer = answerTemplate.content.firstElementChild.cloneNode(true);
  answer.classList.add("streaming");
  conversation.append(answer);
  answer.scrollIntoView({ block: "end" });
  try {
    messages.push({ role: "assistant", content: await streamAnswer(answer) });
    answer.classList.remove("streaming");
    answer.querySelector(".thumbs").hidden = false;
  } catch (error) {
    // The question was not answered: it leaves the conversation and returns to the prompt, to send again.
    messages.pop();
    question.remove();
    answer.remove();
    prompt.value = content;
    showError(error instanceof APIError ? error.message : `The server could not be reached: ${error.message}`);
  }
}

// A rating can change: the other thumb later records a new rating that supersedes the first.
async function rate(answer, button) {
  const status = answer.querySelector(".status");
  const thumbs = answer.querySelectorAll(".thumb");
  thumbs.forEach((thumb) => (thumb.disabled = true));
  try {
    const body = JSON.stringify({ completion_id: answer.dataset.completionId, rating: button.dataset.rating });
    await call("/v1/feedback", { method: "POST", body });
    thumbs.forEach((thumb) => thumb.setAttribute("aria-pressed", String(thumb === button)));
    status.textContent = "Thanks: recorded.";
  } catch (error) {
    status.textContent = `Not recorded: ${error.message}`;
  } finally {
    thumbs.forEach((thumb) => (thumb.disabled = false));
  }
}

keyInput.value = localStorage.getItem(KEY_STORAGE) ?? "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  alias = null;
});

document.querySelector("#new-chat").addEventListener("click", () => {
  messages = [];
  conversation.replaceChildren();
  showError("");
});

composer.addEventListener("submit", async (event) => {
  event.preventDefault();
  const content = prompt.value.trim();
  if (!content || sendButton.disabled) return;
  prompt.value = "";
  sendButton.disabled = true;
  await send(content);
  sendButton.disabled = false;
  prompt.focus();
});

prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    composer.requestSubmit();
  }
});

conversation.addEventListener("click", (event) => {
  const button = event.target.closest(".thumb");
  if (button && button.getAttribute("aria-pressed") !== "true") rate(button.closest(".message"), button);
});
