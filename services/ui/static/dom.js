// Building the page: elements from plain data, never from HTML strings, so that a uri, a job id
// or an error message can never inject markup. Formatting helpers the pages share live here too.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(el, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** h("a", {href: "#/jobs"}, "Jobs"): an HTML element with attributes, listeners and children. */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** The same for SVG elements (the cluster map). */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** A hash route from path segments, each one escaped: route("jobs", id, "clusters"). */
export function route(...segments) {
  return "#/" + segments.map((part) => encodeURIComponent(String(part))).join("/");
}

/** The thumbnail of an image: the server's ≤ 256 px copy, loaded only when scrolled near. */
export function thumb(imageId, { size = 128, alt } = {}) {
  const img = h("img", {
    src: `/v1/images/${encodeURIComponent(imageId)}/thumb`,
    loading: "lazy",
    decoding: "async",
    width: size,
    height: size,
    alt: alt ?? `image ${shortId(imageId)}`,
    class: "thumb",
  });
  // A thumbnail that cannot be made (the bytes are gone, a seed image outside the job) shows as
  // a labelled blank rather than the browser's broken-image icon.
  img.addEventListener("error", () => img.classList.add("missing"), { once: true });
  return img;
}

/** Image ids are SHA-256 hex: the first 10 digits tell them apart on a page. */
export function shortId(id) {
  return id && id.length > 16 ? id.slice(0, 10) : String(id);
}

const numberFormat = new Intl.NumberFormat("en");

export function num(value) {
  return value === null || value === undefined ? "–" : numberFormat.format(value);
}

export function sim(value) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(3);
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${value.toFixed(1)} s`;
  return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
}

export function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

/** A status word as a badge whose colour the stylesheet picks from data-status. */
export function status(value) {
  return h("span", { class: "status", dataset: { status: value || "unknown" } }, value || "–");
}

/** An API error as a visible, announced message. */
export function errorBox(error) {
  const code = error && error.code ? ` (${error.code})` : "";
  return h("p", { class: "error", role: "alert" }, `${error.message || error}${code}`);
}

/** Replace the page body, moving keyboard focus to it as a page load would. */
export function mount(node, { title, crumbs = [] } = {}) {
  const main = document.getElementById("main");
  main.replaceChildren(node);
  document.title = title ? `${title} · lvd-curate` : "lvd-curate";
  const list = document.getElementById("crumbs");
  list.replaceChildren(
    ...crumbs.map(([label, href], i) =>
      h(
        "li",
        {},
        href && i < crumbs.length - 1
          ? h("a", { href }, label)
          : h("span", { "aria-current": "page" }, label),
      ),
    ),
  );
  main.focus({ preventScroll: true });
  window.scrollTo(0, 0);
}
