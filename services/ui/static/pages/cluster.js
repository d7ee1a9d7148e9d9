// One cluster: its members nearest the centroid first, paged as the user scrolls (a cluster can
// hold thousands of images; only the pages reached are fetched, and thumbnails load lazily).
// Seed images are marked; every image says how it was retrieved (method, seed, similarity).

import { pager } from "../api.js";
import { h, num, route, shortId, sim, thumb } from "../dom.js";

export async function render({ job, cluster }, page) {
  const grid = h("ol", { class: "grid", "aria-label": `Members of cluster ${cluster}` });
  const summary = h("p", { class: "muted" });
  const members = pager({
    path: `/v1/jobs/${encodeURIComponent(job)}/clusters/${encodeURIComponent(cluster)}/members`,
    limit: 120,
    list: grid,
    renderItem: (member, index) => tile(job, member, index),
    onPage: (_page, count) =>
      (summary.textContent = `${num(count)} members shown, nearest the centroid first.`),
    empty: "This cluster has no members.",
  });
  page.onLeave(members.stop);
  page.mount(
    h(
      "div",
      {},
      h(
        "div",
        { class: "heading" },
        h("h1", {}, `Cluster ${cluster}`),
        h(
          "p",
          { class: "legend" },
          h("span", { class: "badge seed" }, "seed"),
          " a seed set's own image; ",
          h("span", { class: "method" }, "method"),
          " how the crawl image was retrieved",
        ),
      ),
      summary,
      members.element,
    ),
    {
      title: `Cluster ${cluster} of ${job}`,
      crumbs: [
        ["Jobs", "#/jobs"],
        [job, route("jobs", job)],
        ["Clusters", route("jobs", job, "clusters")],
        [`Cluster ${cluster}`],
      ],
    },
  );
}

/** One member: its thumbnail (linked to its provenance), distance and how it was retrieved. */
export function tile(job, member, index) {
  const isSeed = Boolean(member.seed_set);
  const href = isSeed
    ? route("jobs", job, "seeds", member.seed_set, member.image_id)
    : route("jobs", job, "images", member.image_id);
  const retrieved = member.retrieved || [];
  return h(
    "li",
    {
      class: `tile${isSeed ? " is-seed" : ""}`,
      dataset: { image: member.image_id, index, distance: member.distance ?? "" },
    },
    h(
      "a",
      {
        href,
        class: "pic",
        title: isSeed
          ? "this seed image's retrieved neighbours"
          : "the seeds that picked this image",
      },
      thumb(member.image_id, {
        alt: `${isSeed ? `seed image of ${member.seed_set}` : "crawl image"} ${shortId(member.image_id)}`,
      }),
      isSeed ? h("span", { class: "badge seed" }, `seed · ${member.seed_set}`) : null,
    ),
    h(
      "div",
      { class: "meta" },
      member.distance !== undefined && member.distance !== null
        ? h("div", { class: "muted" }, `distance ${sim(member.distance)}`)
        : null,
      retrieved.length
        ? h(
            "ul",
            { class: "why" },
            retrieved.slice(0, 3).map((pick) => h("li", {}, how(job, pick))),
            retrieved.length > 3
              ? h("li", { class: "muted" }, `+${retrieved.length - 3} more`)
              : null,
          )
        : isSeed
          ? null
          : h("div", { class: "muted" }, "not retrieved"),
    ),
  );
}

/** How one retrieval picked an image: method and score, then the seed (linked) or the set. */
function how(job, pick) {
  const method = h("span", { class: "method", dataset: { method: pick.method } }, pick.method);
  const score = h(
    "span",
    { class: "sim", title: pick.seed_id ? "cosine to the seed" : "cosine to the centroid" },
    sim(pick.similarity),
  );
  const from = pick.seed_id
    ? h(
        "a",
        {
          href: route("jobs", job, "seeds", pick.seed_set, pick.seed_id),
          class: "from",
          title: `seed ${pick.seed_id} of ${pick.seed_set}`,
        },
        `${pick.seed_set}:${shortId(pick.seed_id).slice(0, 8)}`,
      )
    : h("span", { class: "from muted" }, pick.seed_set);
  return [method, " ", score, " ", from];
}
