// Sign in: the token (from `curate tokens create`) goes once to POST /v1/session, which answers
// with an HttpOnly cookie; the page never stores the token itself.

import { afterLogin, api } from "../api.js";
import { errorBox, h } from "../dom.js";

export async function render(_params, page) {
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "current-password",
    required: true,
    spellcheck: "false",
    "aria-describedby": "token-help",
  });
  const message = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Sign in");
  const form = h(
    "form",
    { class: "card narrow", onsubmit: signIn },
    h("h1", {}, "Sign in"),
    h("label", { for: "token" }, "API token"),
    input,
    h(
      "p",
      { id: "token-help", class: "muted" },
      "A token from ",
      h("code", {}, "curate tokens create --scope write"),
      " (or read, to browse only). ",
      h("code", {}, "make serve"),
      " prints one.",
    ),
    message,
    submit,
  );

  async function signIn(event) {
    event.preventDefault();
    submit.disabled = true;
    message.replaceChildren();
    try {
      await api("/v1/session", { method: "POST", body: { token: input.value.trim() } });
      location.hash = afterLogin();
    } catch (error) {
      message.replaceChildren(
        errorBox(
          error.status === 401
            ? { message: "That token is not valid (unknown or revoked)." }
            : error,
        ),
      );
      input.focus();
    } finally {
      submit.disabled = false;
    }
  }

  page.mount(form, { title: "Sign in", crumbs: [["Sign in"]] });
  input.focus();
}
