// A seed image and the crawl images it retrieved, best match first: the provenance of a seed.

import { api } from "../api.js";
import { h, num, route, shortId, sim, thumb } from "../dom.js";

export async function render({ job, set, seed }, page) {
  const path = `/v1/jobs/${encodeURIComponent(job)}/seeds/${encodeURIComponent(set)}/${encodeURIComponent(seed)}/neighbours`;
  const data = await api(path);
  const items = data.items || [];
  const grid = h(
    "ol",
    { class: "grid", "aria-label": "Retrieved neighbours" },
    items.map((item) =>
      h(
        "li",
        { class: "tile", dataset: { image: item.image_id } },
        h(
          "a",
          {
            href: route("jobs", job, "images", item.image_id),
            class: "pic",
            title: "the seeds that picked this image",
          },
          thumb(item.image_id, { alt: `neighbour ${item.rank} ${shortId(item.image_id)}` }),
        ),
        h(
          "div",
          { class: "meta" },
          h(
            "div",
            {},
            h("span", { class: "method", dataset: { method: item.method } }, item.method),
            ` rank ${num(item.rank)} · `,
            h("span", { class: "sim", title: "cosine similarity" }, sim(item.similarity)),
          ),
          item.cluster_id !== null && item.cluster_id !== undefined
            ? h(
                "div",
                {},
                h(
                  "a",
                  { href: route("jobs", job, "clusters", item.cluster_id) },
                  `cluster ${item.cluster_id}`,
                ),
              )
            : null,
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
          { href: `/v1/images/${encodeURIComponent(seed)}`, title: "the original image" },
          thumb(seed, { size: 192, alt: `seed image ${shortId(seed)} of ${set}` }),
        ),
        h(
          "div",
          {},
          h("h1", {}, "Seed ", h("code", {}, shortId(seed))),
          h(
            "p",
            {},
            "Seed set ",
            h("b", {}, set),
            ". ",
            `${num(items.length)} crawl images retrieved from this seed.`,
          ),
          h("p", { class: "muted id" }, seed),
        ),
      ),
      h("h2", {}, "Retrieved neighbours"),
      items.length
        ? grid
        : h(
            "p",
            { class: "muted" },
            "This seed retrieved nothing (cluster and balanced picks name no seed).",
          ),
    ),
    {
      title: `Seed ${shortId(seed)}`,
      crumbs: [["Jobs", "#/jobs"], [job, route("jobs", job)], [`Seed ${set}:${shortId(seed)}`]],
    },
  );
}
