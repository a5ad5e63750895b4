// The chat page: a plain client of liveloop's OpenAI-compatible API (no build step, no dependencies).
// Answers stream from POST /v1/chat/completions; each answer's thumbs go to POST /v1/feedback with its completion id.
// In comparison mode a question asks for two answers (n = 2), shown side by side without their versions, and
// "this one is better" sends the pair as a ranking, preferred first.

const KEY_STORAGE = "liveloop.apiKey";
const COMPARE_STORAGE = "liveloop.compare";

const keyInput = document.querySelector("#api-key");
const compareToggle = document.querySelector("#compare");
const conversation = document.querySelector("#conversation");
const composer = document.querySelector("#composer");
const prompt = document.querySelector("#prompt");
const sendButton = document.querySelector("#send");
const errorBanner = document.querySelector("#error");
const answerTemplate = document.querySelector("#answer-template");

// The whole conversation is sent with every request: the API is stateless.
let messages = [];
let alias = null; // the model name to ask for, learnt from the server with the current key
const replyOf = new WeakMap(); // a comparison's element -> its answer's entry in `messages`

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

// Streams one request's answers into their elements (with n = 2 the chunks of both interleave, each choice
// naming its index) and returns their texts.
async function streamAnswers(answers) {
  const body = JSON.stringify({ model: await liveAlias(), messages, stream: true, n: answers.length });
  const response = await call("/v1/chat/completions", { method: "POST", body });
  for await (const chunk of events(response)) {
    if (chunk.error) throw new APIError(describe(null, chunk)); // an error after the stream began
    for (const choice of chunk.choices) {
      const answer = answers[choice.index];
      if (choice.completion_id) answer.dataset.completionId = choice.completion_id; // on a choice's first chunk
      answer.querySelector(".text").textContent += choice.delta?.content ?? "";
    }
    // A pair does not say which version wrote which answer: the choice between them stays blind.
    if (answers.length === 1) answers[0].querySelector(".model").textContent = `answered by ${chunk.model}`;
  }
  return answers.map((answer) => answer.querySelector(".text").textContent);
}

function newAnswer() {
  const answer = answerTemplate.content.firstElementChild.cloneNode(true);
  answer.classList.add("streaming");
  return answer;
}

function comparisonOf(answers) {
  const comparison = document.createElement("div");
  comparison.className = "comparison";
  comparison.append(...answers);
  return comparison;
}

async function send(content) {
  showError("");
  messages.push({ role: "user", content });
  const question = addMessage("user", content);
  const answers = Array.from({ length: compareToggle.checked ? 2 : 1 }, newAnswer);
  const shown = answers.length === 1 ? answers[0] : comparisonOf(answers);
  conversation.append(shown);
  shown.scrollIntoView({ block: "end" });
  try {
    // The conversation goes on from the first answer until the other one is preferred.
    const reply = { role: "assistant", content: (await streamAnswers(answers))[0] };
    messages.push(reply);
    replyOf.set(shown, reply);
    for (const answer of answers) {
      answer.classList.remove("streaming");
      answer.querySelector(answers.length === 1 ? ".thumbs" : ".prefer").hidden = false;
    }
    shown.scrollIntoView({ block: "end" }); // it grew while streaming: its buttons come into view
  } catch (error) {
    // The question was not answered: it leaves the conversation and returns to the prompt, to send again.
    messages.pop();
    question.remove();
    shown.remove();
    prompt.value = content;
    showError(error instanceof APIError ? error.message : `The server could not be reached: ${error.message}`);
  }
}

// Sends one piece of feedback, its controls disabled meanwhile, and says in `status` whether it was recorded.
async function record(feedback, controls, status) {
  controls.forEach((control) => (control.disabled = true));
  try {
    await call("/v1/feedback", { method: "POST", body: JSON.stringify(feedback) });
    status.textContent = "Thanks: recorded.";
    return true;
  } catch (error) {
    status.textContent = `Not recorded: ${error.message}`;
    return false;
  } finally {
    controls.forEach((control) => (control.disabled = false));
  }
}

function press(buttons, pressed) {
  buttons.forEach((button) => button.setAttribute("aria-pressed", String(button === pressed)));
}

// A rating can change: the other thumb later records a new rating that supersedes the first.
async function rate(answer, button) {
  const thumbs = answer.querySelectorAll(".thumb");
  const feedback = { completion_id: answer.dataset.completionId, rating: button.dataset.rating };
  if (await record(feedback, thumbs, answer.querySelector(".status"))) press(thumbs, button);
}

// So can a preference: choosing the other answer later records a new ranking that supersedes the first.
async function prefer(preferred) {
  const comparison = preferred.closest(".comparison");
  const answers = [...comparison.querySelectorAll(".message")];
  const other = answers.find((answer) => answer !== preferred);
  const buttons = comparison.querySelectorAll(".prefer");
  answers.forEach((answer) => (answer.querySelector(".status").textContent = ""));
  const feedback = { ranking: [preferred.dataset.completionId, other.dataset.completionId] };
  if (!(await record(feedback, buttons, preferred.querySelector(".status")))) return;
  press(buttons, preferred.querySelector(".prefer"));
  // Only while nothing was asked after it: a later question was answered with this history.
  const reply = replyOf.get(comparison);
  if (messages.at(-1) === reply) reply.content = preferred.querySelector(".text").textContent;
}

keyInput.value = localStorage.getItem(KEY_STORAGE) ?? "";
compareToggle.checked = localStorage.getItem(COMPARE_STORAGE) === "on";
compareToggle.addEventListener("change", () => localStorage.setItem(COMPARE_STORAGE, compareToggle.checked ? "on" : "off"));
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
  const button = event.target.closest(".thumb, .prefer");
  if (!button || button.getAttribute("aria-pressed") === "true") return;
  if (button.classList.contains("thumb")) rate(button.closest(".message"), button);
  else prefer(button.closest(".message"));
});
