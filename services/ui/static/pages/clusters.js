// The cluster browser: every k-means cluster of a job as a card (size, the seed images it holds
// per seed set, what retrieval took from it, the images nearest its centroid), largest or best
// covered by seed sets first, loaded a page at a time as the user scrolls.

import { pager } from "../api.js";
import { h, num, route, thumb } from "../dom.js";

const SORTS = [
  ["size", "Size"],
  ["seed_coverage", "Seed coverage"],
];

export async function render({ job }, page) {
  const sort = SORTS.some(([key]) => key === page.query.get("sort"))
    ? page.query.get("sort")
    : "size";
  const grid = h("ol", { class: "cards", "aria-label": "Clusters" });
  const summary = h("p", { class: "muted" });
  const clusters = pager({
    path: `/v1/jobs/${encodeURIComponent(job)}/clusters`,
    params: { sort },
    limit: 48,
    list: grid,
    renderItem: (cluster) => card(job, cluster),
    onPage: (_page, count) =>
      (summary.textContent = `${num(count)} clusters loaded, sorted by ${sort.replace("_", " ")}.`),
    empty: "This job has no clusters.",
  });
  page.onLeave(clusters.stop);

  const sorter = h(
    "nav",
    { class: "sort", "aria-label": "Sort clusters" },
    "Sort by ",
    SORTS.map(([key, label]) =>
      h(
        "a",
        {
          href: `${route("jobs", job, "clusters")}?sort=${key}`,
          class: "button",
          "aria-current": key === sort ? "true" : null,
        },
        label,
      ),
    ),
  );
  page.mount(
    h(
      "div",
      {},
      h(
        "div",
        { class: "heading" },
        h("h1", {}, "Clusters"),
        sorter,
        h("a", { href: route("jobs", job, "map") }, "Map of the centroids"),
      ),
      summary,
      clusters.element,
    ),
    {
      title: `Clusters of ${job}`,
      crumbs: [["Jobs", "#/jobs"], [job, route("jobs", job)], ["Clusters"]],
    },
  );
}

function card(job, cluster) {
  const href = route("jobs", job, "clusters", cluster.cluster_id);
  const seeds = Object.entries(cluster.seeds || {});
  const seedTotal = cluster.seed_coverage ?? seeds.reduce((sum, [, n]) => sum + n, 0);
  const retrieved = Object.entries(cluster.retrieved || {});
  return h(
    "li",
    {
      class: "card cluster",
      dataset: { cluster: cluster.cluster_id, size: cluster.size, coverage: seedTotal },
    },
    h(
      "h2",
      {},
      h("a", { href }, `Cluster ${cluster.cluster_id}`),
      h("span", { class: "size" }, ` ${num(cluster.size)} images`),
    ),
    h(
      "p",
      { class: "coverage" },
      seedTotal
        ? [
            `${num(seedTotal)} seed image${seedTotal === 1 ? "" : "s"}: `,
            seeds.map(([set, n], i) => [i ? ", " : "", h("b", {}, set), ` ${num(n)}`]),
          ]
        : h("span", { class: "muted" }, "no seed images"),
    ),
    h(
      "p",
      { class: "retrieved" },
      retrieved.length
        ? [
            "retrieved: ",
            retrieved.map(([method, n], i) => [
              i ? ", " : "",
              h("span", { class: "method", dataset: { method } }, method),
              ` ${num(n)}`,
            ]),
          ]
        : h("span", { class: "muted" }, "nothing retrieved"),
    ),
    h(
      "a",
      {
        href,
        class: "strip",
        "aria-label": `Cluster ${cluster.cluster_id}: the images nearest its centroid`,
      },
      (cluster.nearest || []).slice(0, 8).map((id) => thumb(id, { size: 72, alt: "" })),
    ),
  );
}
