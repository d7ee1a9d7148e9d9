// One job: headline counts, per-stage progress kept live from the event stream, cancel / resume /
// delete, the errors by reason (with example rows on demand), and the ways into its results.

import { api, pager } from "../api.js";
import { errorBox, h, num, route, seconds, status, when } from "../dom.js";

const ACTIVE = new Set(["created", "running", "cancelling"]);

export async function render({ job: jobId }, page) {
  const detail = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const parts = {
    status: h("span"),
    message: h("p", { class: "job-message" }),
    actions: h("div", { class: "actions" }),
    counts: h("dl", { class: "counts" }),
    stages: h("tbody"),
    results: h("nav", { class: "results", "aria-label": "Results" }),
    errors: h("div", { class: "reasons" }),
    live: h("p", { class: "muted", role: "status" }),
    notice: h("div", { "aria-live": "assertive" }),
  };
  const reasons = new Map();
  const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
  const logLink = h("a", { href: `${base}/log`, target: "_blank", rel: "noopener" }, "Driver log");

  function update(job) {
    parts.status.replaceChildren(status(job.status));
    parts.message.textContent = job.message || "";
    const c = job.counts || {};
    parts.counts.replaceChildren(
      ...[
        ["Items read", c.items_read],
        ["Images kept after dedup", c.images_kept],
        ["Images embedded", c.images_embedded],
        ["Curated images", c.curated_images],
        ["Errors", c.errors],
      ].map(([label, value]) => h("div", {}, h("dt", {}, label), h("dd", {}, num(value)))),
    );
    parts.stages.replaceChildren(...(job.stages || []).map(stageRow));
    parts.actions.replaceChildren(...actions(job));
    parts.results.replaceChildren(...resultLinks(job));
    updateReasons(job);
    parts.live.textContent = ACTIVE.has(job.status)
      ? `Live · updated ${new Date().toLocaleTimeString()}`
      : `Finished ${when(job.updated_at)}`;
  }

  function actions(job) {
    const running = ACTIVE.has(job.status);
    const act = (label, verb, enabled) =>
      h(
        "button",
        {
          type: "button",
          disabled: !enabled,
          dataset: { action: verb },
          onclick: () => post(verb),
        },
        label,
      );
    return [
      act("Cancel", "cancel", job.status === "running"),
      act("Resume", "resume", !running && job.status !== "done"),
      h(
        "button",
        {
          type: "button",
          class: "danger",
          disabled: running,
          dataset: { action: "delete" },
          onclick: remove,
        },
        "Delete",
      ),
      logLink,
    ];
  }

  async function post(verb) {
    parts.notice.replaceChildren();
    try {
      update(await api(`${base}/${verb}`, { method: "POST" }));
      follow();
    } catch (error) {
      parts.notice.replaceChildren(errorBox(error));
    }
  }

  async function remove() {
    if (!confirm(`Delete job ${jobId}: its shards, folder and catalog rows?`)) return;
    try {
      await api(base, { method: "DELETE" });
      location.hash = "#/jobs";
    } catch (error) {
      parts.notice.replaceChildren(errorBox(error));
    }
  }

  function updateReasons(job) {
    for (const stage of job.stages || []) {
      for (const [reason, count] of Object.entries(stage.errors_by_reason || {})) {
        const key = `${stage.stage}/${reason}`;
        if (!reasons.has(key)) {
          const counter = h("span", { class: "n" });
          const item = h(
            "details",
            { class: "reason", dataset: { reason, stage: stage.stage } },
            h("summary", {}, h("code", {}, reason), ` in ${stage.stage}: `, counter),
          );
          // The examples are fetched when the reason is opened, a page at a time.
          item.addEventListener(
            "toggle",
            () => {
              const list = h("ul", { class: "examples" });
              const rows = pager({
                path: `${base}/errors`,
                params: { stage: stage.stage, reason },
                limit: 10,
                auto: false,
                list,
                renderItem: (row) =>
                  h(
                    "li",
                    {},
                    h("span", { class: "uri" }, row.uri || "(no uri)"),
                    h("span", { class: "muted" }, ` ${row.detail || ""}`),
                  ),
              });
              page.onLeave(rows.stop);
              item.append(rows.element);
            },
            { once: true },
          );
          reasons.set(key, { item, counter });
          parts.errors.append(item);
        }
        reasons.get(key).counter.textContent = num(count);
      }
    }
    if (!reasons.size) parts.errors.replaceChildren(h("p", { class: "muted" }, "No errors."));
    else parts.errors.querySelector(":scope > p")?.remove();
  }

  // Live progress: the event stream while the job runs. EventSource reconnects by itself with
  // Last-Event-ID; a stream the server refused (401, 404) is closed and checked by a plain GET.
  let stream = null;
  function follow() {
    if (stream) return;
    stream = new EventSource(`${base}/events`);
    const onEvent = (event) => {
      try {
        update(JSON.parse(event.data));
      } catch (error) {
        console.error("bad event", error);
      }
    };
    stream.addEventListener("progress", onEvent);
    stream.addEventListener("end", (event) => {
      onEvent(event);
      stop();
    });
    stream.addEventListener("error", async () => {
      if (stream && stream.readyState === EventSource.CLOSED) {
        stop();
        try {
          const job = await api(base);
          update(job);
          if (ACTIVE.has(job.status) && page.live) setTimeout(follow, 2000);
        } catch (error) {
          parts.notice.replaceChildren(errorBox(error));
        }
      }
    });
  }
  function stop() {
    if (stream) stream.close();
    stream = null;
  }
  page.onLeave(stop);

  update(detail);
  page.mount(
    h(
      "div",
      { class: "job" },
      h("div", { class: "heading" }, h("h1", {}, `Job ${jobId} `, parts.status), parts.actions),
      parts.notice,
      parts.message,
      h(
        "p",
        { class: "muted" },
        "Source ",
        h("code", {}, detail.source),
        ` · created ${when(detail.created_at)}`,
      ),
      parts.results,
      parts.counts,
      h("h2", {}, "Stages"),
      parts.live,
      h(
        "table",
        { class: "stages" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["Stage", "Status", "Parts", "Rows in", "Rows out", "Errors", "Time", ""].map((label) =>
              h("th", { scope: "col" }, label),
            ),
          ),
        ),
        parts.stages,
      ),
      h("h2", {}, "Errors by reason"),
      parts.errors,
    ),
    { title: `Job ${jobId}`, crumbs: [["Jobs", "#/jobs"], [jobId]] },
  );
  if (ACTIVE.has(detail.status)) follow();
}

function stageRow(stage) {
  const total = stage.parts_total || 0;
  const done = stage.parts_done || 0;
  return h(
    "tr",
    { dataset: { stage: stage.stage, status: stage.status || "" } },
    h("th", { scope: "row" }, stage.stage),
    h("td", {}, status(stage.status)),
    h(
      "td",
      { class: "progress" },
      h("progress", {
        max: total || 1,
        value: total ? done : 0,
        "aria-label": `${stage.stage}: ${done} of ${total} parts`,
      }),
      ` ${num(done)} / ${total ? num(total) : "?"}`,
    ),
    h("td", { class: "n" }, num(stage.rows_in)),
    h("td", { class: "n" }, num(stage.rows_out)),
    h("td", { class: "n" }, num(stage.errors)),
    h("td", { class: "n" }, seconds(stage.seconds)),
    h("td", { class: "muted" }, stage.message || ""),
  );
}

function resultLinks(job) {
  const done = new Set((job.stages || []).filter((s) => s.status === "done").map((s) => s.stage));
  const link = (label, href, ready, why) =>
    ready
      ? h("a", { href, class: "button" }, label)
      : h("span", { class: "button disabled", title: why }, label);
  return [
    link(
      "Clusters",
      route("jobs", job.job_id, "clusters"),
      done.has("cluster"),
      "after the cluster stage",
    ),
    link("Map", route("jobs", job.job_id, "map"), done.has("cluster"), "after the cluster stage"),
    link("Dedup", route("jobs", job.job_id, "dedup"), done.has("dedup"), "after the dedup stage"),
  ];
}
