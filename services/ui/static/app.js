// The UI's entry point: a hash router. Every page is a module exporting `render(params, page)`;
// `page` collects what must stop when the user leaves (event streams, scroll observers).

import { api, toLogin } from "./api.js";
import { errorBox, mount } from "./dom.js";
import * as clusters from "./pages/clusters.js";
import * as cluster from "./pages/cluster.js";
import * as dedup from "./pages/dedup.js";
import * as image from "./pages/image.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as login from "./pages/login.js";
import * as map from "./pages/map.js";
import * as seed from "./pages/seed.js";

// Most specific first; `:name` captures one path segment.
const ROUTES = [
  ["login", login],
  ["jobs", jobs],
  ["jobs/:job", job],
  ["jobs/:job/clusters", clusters],
  ["jobs/:job/clusters/:cluster", cluster],
  ["jobs/:job/seeds/:set/:seed", seed],
  ["jobs/:job/images/:image", image],
  ["jobs/:job/dedup", dedup],
  ["jobs/:job/map", map],
];

function match(hash) {
  const [path, query = ""] = hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  for (const [pattern, module] of ROUTES) {
    const names = pattern.split("/");
    if (names.length !== parts.length) continue;
    const params = {};
    const ok = names.every((name, i) => {
      if (name.startsWith(":")) {
        params[name.slice(1)] = decodeURIComponent(parts[i]);
        return true;
      }
      return name === parts[i];
    });
    if (ok) return { module, params, query: new URLSearchParams(query) };
  }
  return null;
}

let leaving = [];
// Whether the service asks for tokens (`curate serve --no-auth` says no): sign-out only then.
let authOn = true;

function leave() {
  for (const stop of leaving) {
    try {
      stop();
    } catch (error) {
      console.error(error);
    }
  }
  leaving = [];
}

async function show() {
  leave();
  if (!location.hash || location.hash === "#" || location.hash === "#/") {
    location.replace("#/jobs");
    return;
  }
  const found = match(location.hash);
  if (!found) {
    mount(errorBox({ message: `No page at ${location.hash}.` }), {
      title: "Not found",
      crumbs: [["Not found"]],
    });
    return;
  }
  const token = Symbol("render");
  show.current = token;
  document.getElementById("signout").hidden = !authOn || found.module === login;
  // A page mounts through page.mount, which does nothing once the user has moved on: a slow
  // answer for the previous page never overwrites the current one.
  const page = {
    query: found.query,
    onLeave: (fn) => leaving.push(fn),
    get live() {
      return show.current === token;
    },
    mount: (node, options) => show.current === token && mount(node, options),
  };
  try {
    await found.module.render(found.params, page);
  } catch (error) {
    // A stale render (the user moved on meanwhile) must not overwrite the new page.
    if (show.current !== token || error.status === 401) return;
    console.error(error);
    mount(errorBox(error), { title: "Error", crumbs: [["Jobs", "#/jobs"], ["Error"]] });
  }
}

async function signOut() {
  try {
    await api("/v1/session", { method: "DELETE" });
  } finally {
    toLogin();
  }
}

function start() {
  const button = document.getElementById("signout");
  button.addEventListener("click", signOut);
  window.addEventListener("hashchange", show);
  api("/v1/health")
    .then((health) => {
      authOn = health.auth !== false;
      if (!authOn) button.hidden = true;
    })
    .catch(() => {});
  show();
}

start();
