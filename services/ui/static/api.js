// The one way the UI talks to the service: same-origin fetches of /v1 with the session cookie.
// A 401 anywhere sends the user to the sign-in page and back to where they were afterwards.

import { h } from "./dom.js";

/** An error body of the API ({"error": {kind, code, message, field}}) as an exception. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the service answered HTTP ${status}`);
    this.status = status;
    this.kind = error.kind || null;
    this.code = error.code || null;
    this.field = error.field || null;
  }
}

const RETURN_KEY = "curate.after-login";

/** Remember where the user was, and go to sign in. */
export function toLogin() {
  const here = location.hash || "#/jobs";
  if (!here.startsWith("#/login")) sessionStorage.setItem(RETURN_KEY, here);
  location.hash = "#/login";
}

/** Where to go once signed in: the page that asked for it, or the jobs. */
export function afterLogin() {
  const next = sessionStorage.getItem(RETURN_KEY) || "#/jobs";
  sessionStorage.removeItem(RETURN_KEY);
  return next;
}

/**
 * Call the API: api("/v1/jobs", {method: "POST", body: {...}, headers: {...}}).
 * Resolves to the parsed JSON (null for 204), rejects with ApiError.
 */
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  const init = {
    method,
    headers: { Accept: "application/json", ...headers },
    credentials: "same-origin",
    signal,
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401 && !path.startsWith("/v1/session")) {
    toLogin();
  }
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json")
    ? await response.json().catch(() => null)
    : await response.text();
  if (!response.ok) throw new ApiError(response.status, typeof data === "object" ? data : null);
  return data;
}

/** A path with query parameters, leaving out the empty ones. */
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") query.set(key, value);
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}

/** An idempotency key for one submission of a form: a retry of the same click is the same job. */
export function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * Pages of a cursor-paged endpoint appended to `list` as the user scrolls: a "Load more" button
 * at the end is both the IntersectionObserver's sentinel (it loads the next page while still
 * 600 px below the fold) and the keyboard's way to the same. Only pages the user reaches are
 * fetched, so a cluster of 100,000 images costs what is looked at.
 *
 * With `auto: false` only the button loads more (short lists inside a page, like error examples).
 *
 * Returns {element, stop, loaded}: `element` holds the list and the button; `stop` ends
 * observing (call it when leaving the page); `loaded()` the items fetched so far.
 */
export function pager({
  path,
  params = {},
  limit = 100,
  list,
  renderItem,
  onPage,
  empty = "Nothing here.",
  auto = true,
}) {
  let cursor = null;
  let done = false;
  let busy = false;
  let count = 0;
  const more = h("button", { type: "button", class: "more" }, "Load more");
  const note = h("p", { class: "muted pager-note", role: "status" });
  const element = h("div", { class: "pager" }, list, note, more);
  let observer = null;

  async function next() {
    if (busy || done) return;
    busy = true;
    more.disabled = true;
    note.textContent = "Loading…";
    try {
      const page = await api(withQuery(path, { ...params, limit, cursor }));
      for (const item of page.items) list.append(renderItem(item, count++));
      cursor = page.next_cursor;
      done = !cursor;
      if (onPage) onPage(page, count);
      note.textContent = done ? (count ? `All ${count.toLocaleString("en")} shown.` : empty) : "";
    } catch (error) {
      note.textContent = "";
      note.append(error.message || String(error));
      note.classList.add("error");
      done = true;
    } finally {
      busy = false;
      more.disabled = false;
      more.hidden = done;
      if (done && observer) observer.disconnect();
    }
    // A page that did not fill the screen leaves the sentinel in view: the observer does not
    // fire again for an element that stays visible, so ask for the next page ourselves.
    if (auto && !done && isNear(more)) next();
  }

  more.addEventListener("click", next);
  if (auto && "IntersectionObserver" in window) {
    observer = new IntersectionObserver(
      (entries) => {
        if (entries.some((entry) => entry.isIntersecting)) next();
      },
      { rootMargin: "600px 0px" },
    );
    observer.observe(more);
  }
  next();
  return { element, stop: () => observer && observer.disconnect(), loaded: () => count };
}

function isNear(el) {
  if (!el.isConnected) return false;
  const box = el.getBoundingClientRect();
  return box.top < window.innerHeight + 600;
}
