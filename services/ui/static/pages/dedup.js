// Dedup decisions: each group of duplicates with the representative it kept first, then every
// image removed for it, with the reason (exact, pca_hash, copy, eval_contamination) and score.

import { pager } from "../api.js";
import { h, num, route, shortId, sim, thumb } from "../dom.js";

// The reasons of schemas/shards.py DEDUP, in the order dedup applies them.
const REASONS = ["exact", "pca_hash", "copy", "eval_contamination"];

export async function render({ job }, page) {
  const reason = REASONS.includes(page.query.get("reason")) ? page.query.get("reason") : "";
  const list = h("ol", { class: "groups", "aria-label": "Duplicate groups" });
  const summary = h("p", { class: "muted" });
  const groups = pager({
    path: `/v1/jobs/${encodeURIComponent(job)}/dedup/groups`,
    params: { reason },
    limit: 30,
    list,
    renderItem: (group) => groupRow(job, group),
    onPage: (_page, count) => (summary.textContent = `${num(count)} groups shown.`),
    empty: reason
      ? `No group has images removed as ${reason}.`
      : "Dedup removed nothing in this job.",
  });
  page.onLeave(groups.stop);
  const base = route("jobs", job, "dedup");
  const filter = h(
    "nav",
    { class: "sort", "aria-label": "Filter by reason" },
    "Reason ",
    ["", ...REASONS].map((key) =>
      h(
        "a",
        {
          href: key ? `${base}?reason=${key}` : base,
          class: "button",
          "aria-current": key === reason ? "true" : null,
        },
        key || "all",
      ),
    ),
  );
  page.mount(
    h(
      "div",
      {},
      h("div", { class: "heading" }, h("h1", {}, "Dedup"), filter),
      summary,
      groups.element,
    ),
    {
      title: `Dedup of ${job}`,
      crumbs: [["Jobs", "#/jobs"], [job, route("jobs", job)], ["Dedup"]],
    },
  );
}

function groupRow(job, group) {
  // Every occurrence is a member: an exact repeat has the representative's own image_id, so
  // what was removed is told by `keep`, not by the id.
  const members = group.members || [];
  const kept = members.find((m) => m.keep) || { image_id: group.representative, uri: null };
  const removed = members.filter((m) => !m.keep);
  return h(
    "li",
    { class: "card group", dataset: { group: group.group_id } },
    h(
      "h2",
      {},
      `Group ${shortId(group.group_id)} `,
      h(
        "span",
        { class: "muted" },
        `${num(group.size ?? removed.length + 1)} occurrences, ${(group.reasons || []).join(", ")}`,
      ),
    ),
    h(
      "ol",
      { class: "grid small" },
      h(
        "li",
        { class: "tile kept" },
        h(
          "a",
          {
            href: route("jobs", job, "images", kept.image_id),
            class: "pic",
            title: kept.uri || "",
          },
          thumb(kept.image_id, { alt: `kept representative ${shortId(kept.image_id)}` }),
          h("span", { class: "badge kept" }, "kept"),
        ),
        h("div", { class: "meta" }, "representative"),
      ),
      removed.map((m) =>
        h(
          "li",
          { class: "tile removed", dataset: { image: m.image_id, reason: m.reason } },
          h(
            "a",
            { href: route("jobs", job, "images", m.image_id), class: "pic", title: m.uri || "" },
            thumb(m.image_id, { alt: `removed ${m.reason} ${shortId(m.image_id)}` }),
          ),
          h(
            "div",
            { class: "meta" },
            h("span", { class: "method" }, m.reason),
            " ",
            h("span", { class: "sim", title: "similarity" }, sim(m.similarity)),
            m.image_id === kept.image_id ? h("div", { class: "muted" }, "the same bytes") : null,
            m.duplicate_of && m.duplicate_of !== kept.image_id
              ? h("div", { class: "muted" }, `of ${duplicateOf(m.duplicate_of)}`)
              : null,
          ),
        ),
      ),
    ),
    group.size > (group.members || []).length
      ? h(
          "p",
          { class: "muted" },
          `The first ${num(group.members.length)} of ${num(group.size)} occurrences.`,
        )
      : null,
  );
}

// "<eval set>:<image_id>" for eval contamination, an image_id otherwise.
function duplicateOf(value) {
  const [set, id] = value.includes(":") ? value.split(":", 2) : [null, value];
  return set ? `${set}:${shortId(id)}` : shortId(id);
}
