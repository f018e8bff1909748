// The API as the console reads it: the token from sessionStorage, refusals as values,
// and live reads through Consul's blocking queries (?index=&wait=), polling where a
// route has no index.
const TOKEN_KEY = "konsul.token";
const listeners = new Set();
let state = "idle";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY) || "",
  set: (secret) => sessionStorage.setItem(TOKEN_KEY, secret),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export function onConnection(listener) { listeners.add(listener); listener(state); }
function setState(next) {
  if (next !== state) { state = next; for (const listener of listeners) listener(state); }
}

export class ApiError extends Error {
  constructor(status, code, detail) { super(detail || code); this.status = status; this.code = code; }
}

// One request: the JSON body (or text), the X-Consul-Index, the status.
export async function api(path, { method = "GET", body, signal, raw = false } = {}) {
  const headers = {};
  const secret = token.get();
  if (secret) headers["X-Consul-Token"] = secret;
  let payload = body;
  if (body !== undefined && typeof body !== "string") { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, signal, cache: "no-store" });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    setState("offline");
    throw new ApiError(0, "offline", "the agent cannot be reached");
  }
  setState("live");
  const index = Number(response.headers.get("X-Consul-Index") || 0);
  const text = await response.text();
  let data = null;
  if (raw) data = text;
  else if (text) { try { data = JSON.parse(text); } catch { data = text; } }
  if (!response.ok && response.status !== 404) {
    throw new ApiError(response.status, data && data.error, data && data.detail);
  }
  return { status: response.status, data, index };
}

// Call onData with each new answer to path until signal aborts: a blocking query when the
// route answers with an index, else a poll every few seconds. Errors go to onError.
export async function live(path, onData, signal, onError = () => {}) {
  let index = 0;
  let failures = 0;
  let last = null; // a polled answer the same as the last one is not handed on (no re-render)
  while (!signal.aborted) {
    const sep = path.includes("?") ? "&" : "?";
    const url = index ? `${path}${sep}index=${index}&wait=30s` : path;
    try {
      const answer = await api(url, { signal });
      failures = 0;
      const text = JSON.stringify(answer.data);
      if ((!index || answer.index !== index) && (answer.index || text !== last)) onData(answer);
      last = text;
      if (answer.index && answer.index >= index) index = answer.index;
      else { index = 0; await pause(2000, signal); }
    } catch (error) {
      if (signal.aborted) return;
      onError(error);
      if (error.status === 403 || error.status === 401) return;
      failures += 1;
      if (error.status === 0) setState("reconnecting");
      index = 0;
      await pause(Math.min(10000, 500 * 2 ** failures), signal);
    }
  }
}

export function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal && signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// A query string from an object, leaving out empty values.
export function qs(params) {
  const found = Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== false);
  return found.length ? "?" + found.map(([k, v]) => v === true || v === "" ? encodeURIComponent(k)
    : `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join("&") : "";
}

export const b64decode = (text) => {
  if (text == null) return "";
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new TextDecoder().decode(bytes);
};
