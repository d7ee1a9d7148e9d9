// The map: the job's cluster centroids laid out in 2-D (PCA, computed by the service once per
// job) as circles whose area is the cluster's size and whose colour is its seed coverage. Each
// circle is a link to its cluster, so the map works with a keyboard too.

import { api } from "../api.js";
import { h, num, route, s } from "../dom.js";

const WIDTH = 960;
const HEIGHT = 600;

export async function render({ job }, page) {
  const data = await api(`/v1/jobs/${encodeURIComponent(job)}/map`);
  const clusters = data.clusters || [];
  const crumbs = [["Jobs", "#/jobs"], [job, route("jobs", job)], ["Map"]];
  if (!clusters.length) {
    page.mount(h("p", { class: "muted" }, "This job has no clusters to map."), {
      title: `Map of ${job}`,
      crumbs,
    });
    return;
  }
  const xs = clusters.map((c) => c.x);
  const ys = clusters.map((c) => c.y);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const maxSize = Math.max(...clusters.map((c) => c.size), 1);
  const maxCover = Math.max(...clusters.map((c) => c.seed_coverage || 0), 0);
  // Area proportional to size; the largest circle a fraction of the plot however many clusters.
  const rMax = Math.max(6, Math.min(40, 400 / Math.sqrt(clusters.length)));
  const pad = rMax + 4;
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (WIDTH - 2 * pad);
  const sy = (y) => HEIGHT - pad - ((y - y0) / (y1 - y0 || 1)) * (HEIGHT - 2 * pad);
  const radius = (size) => Math.max(2, rMax * Math.sqrt(size / maxSize));

  // Small circles last, so that a large cluster never hides a small one.
  const ordered = [...clusters].sort((a, b) => b.size - a.size);
  const svg = s(
    "svg",
    {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      class: "map",
      role: "group",
      "aria-label": `${clusters.length} cluster centroids`,
    },
    ordered.map((c) => {
      const label = `Cluster ${c.cluster_id}: ${num(c.size)} images, seed coverage ${coverageText(c.seed_coverage)}`;
      const [cx, cy, r] = [sx(c.x).toFixed(1), sy(c.y).toFixed(1), radius(c.size)];
      return s(
        "a",
        {
          href: route("jobs", job, "clusters", c.cluster_id),
          "aria-label": label,
          dataset: { cluster: c.cluster_id },
        },
        s(
          "circle",
          { cx, cy, r: r.toFixed(1), fill: colour(c.seed_coverage, maxCover) },
          s("title", {}, label),
        ),
        // The id on circles big enough to carry it; the rest say it on hover (title) and focus.
        r >= 14
          ? s(
              "text",
              {
                x: cx,
                y: cy,
                "text-anchor": "middle",
                "dominant-baseline": "central",
                "aria-hidden": "true",
              },
              c.cluster_id,
            )
          : null,
      );
    }),
  );
  const legend = h(
    "div",
    { class: "map-legend" },
    h("span", {}, "seed coverage: "),
    legendSteps(maxCover).map((value) =>
      h(
        "span",
        { class: "swatch", style: `background:${colour(value, maxCover)}` },
        coverageText(value),
      ),
    ),
    h("span", { class: "muted" }, ` · circle area ∝ cluster size (largest ${num(maxSize)})`),
  );
  page.mount(
    h(
      "div",
      {},
      h(
        "div",
        { class: "heading" },
        h("h1", {}, "Map of the clusters"),
        h("a", { href: route("jobs", job, "clusters") }, "Cluster list"),
      ),
      legend,
      svg,
    ),
    { title: `Map of ${job}`, crumbs },
  );
}

// Five steps from 0 to the largest coverage; whole numbers when coverage counts seed images.
function legendSteps(max) {
  const steps = [0, 0.25, 0.5, 0.75, 1].map((f) => f * max);
  return Number.isInteger(max) ? [...new Set(steps.map(Math.round))] : steps;
}

function coverageText(value) {
  if (value === null || value === undefined) return "–";
  return Number.isInteger(value) ? num(value) : Number(value).toFixed(2);
}

// Grey for clusters no seed set reaches, then light to deep teal as coverage grows.
function colour(value, max) {
  if (!value || !max) return "hsl(220 8% 72%)";
  const t = Math.min(1, value / max);
  return `hsl(${190 - 30 * t} ${45 + 40 * t}% ${70 - 40 * t}%)`;
}
