// A crawl image: where it sits (its cluster), the seeds that picked it and how, and what dedup
// decided about it.

import { api } from "../api.js";
import { h, num, route, shortId, sim, thumb } from "../dom.js";

export async function render({ job, image }, page) {
  const data = await api(
    `/v1/jobs/${encodeURIComponent(job)}/images/${encodeURIComponent(image)}/provenance`,
  );
  const picks = data.picked_by || [];
  const original = `/v1/images/${encodeURIComponent(image)}?job=${encodeURIComponent(job)}`;
  const table = h(
    "table",
    { class: "picks" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Seed set", "Seed", "Method", "Similarity", "Rank"].map((label) =>
          h("th", { scope: "col" }, label),
        ),
      ),
    ),
    h(
      "tbody",
      {},
      picks.map((pick) =>
        h(
          "tr",
          {},
          h("td", {}, pick.seed_set),
          h(
            "td",
            {},
            pick.seed_id
              ? h(
                  "a",
                  {
                    href: route("jobs", job, "seeds", pick.seed_set, pick.seed_id),
                    class: "seed-link",
                  },
                  thumb(pick.seed_id, { size: 48, alt: "" }),
                  ` ${shortId(pick.seed_id)}`,
                )
              : h(
                  "span",
                  { class: "muted" },
                  `no single seed: a ${pick.method} pick of the cluster`,
                ),
          ),
          h(
            "td",
            {},
            h("span", { class: "method", dataset: { method: pick.method } }, pick.method),
          ),
          h("td", { class: "n" }, sim(pick.similarity)),
          h("td", { class: "n" }, num(pick.rank)),
        ),
      ),
    ),
  );
  page.mount(
    h(
      "div",
      { class: "provenance" },
      h(
        "div",
        { class: "subject" },
        h(
          "a",
          { href: original, title: "the original image" },
          thumb(image, { size: 256, alt: `crawl image ${shortId(image)}` }),
        ),
        h(
          "div",
          {},
          h("h1", {}, "Image ", h("code", {}, shortId(image))),
          h("p", { class: "muted id" }, image),
          data.cluster_id !== null && data.cluster_id !== undefined
            ? h(
                "p",
                {},
                "In ",
                h(
                  "a",
                  { href: route("jobs", job, "clusters", data.cluster_id) },
                  `cluster ${data.cluster_id}`,
                ),
                data.distance !== null && data.distance !== undefined
                  ? `, at distance ${sim(data.distance)} from its centroid.`
                  : ".",
              )
            : h("p", { class: "muted" }, "Not in a cluster (removed by dedup, or not embedded)."),
          (data.seed_sets || []).map((set) =>
            h(
              "p",
              {},
              "A seed image of ",
              h("a", { href: route("jobs", job, "seeds", set, image) }, set),
              ": see what it retrieved.",
            ),
          ),
          h("p", {}, h("a", { href: original }, "Open the original")),
        ),
      ),
      h("h2", {}, "Picked by"),
      picks.length ? table : h("p", { class: "muted" }, "No seed set retrieved this image."),
      h("h2", {}, "Dedup"),
      dedupFacts(job, data.dedup),
    ),
    {
      title: `Image ${shortId(image)}`,
      crumbs: [["Jobs", "#/jobs"], [job, route("jobs", job)], [`Image ${shortId(image)}`]],
    },
  );
}

function dedupFacts(job, dedup) {
  if (!dedup)
    return h("p", { class: "muted" }, "No dedup record: the image was kept with no duplicate.");
  const rows = Object.entries(dedup).filter(
    ([, value]) => value !== null && value !== undefined && value !== "",
  );
  return h(
    "dl",
    { class: "facts" },
    rows.flatMap(([key, value]) => {
      let shown =
        typeof value === "number" && !Number.isInteger(value) ? sim(value) : String(value);
      if ((key === "duplicate_of" || key === "group_id") && /^[0-9a-f]{64}$/.test(shown)) {
        shown = h("a", { href: route("jobs", job, "images", shown) }, shortId(shown));
      }
      return [h("dt", {}, key.replace(/_/g, " ")), h("dd", {}, shown)];
    }),
  );
}
