// Jobs: every job with its headline counts (newest first, paged), and the form that submits one.

import { api, newKey, pager } from "../api.js";
import { errorBox, h, num, route, status, when } from "../dom.js";

// The recipes shipped in pipelines/recipes/ (the API has no endpoint listing them).
const RECIPES = [
  ["demo", "demo: tiny ViT, 40 clusters, seconds per stage"],
  ["lvd", "lvd: the paper's settings (ViT-H/14, 100,000 clusters)"],
];
const STAGES = ["ingest", "dedup", "embed", "cluster", "retrieve", "curated"];
const STATUSES = ["", "created", "running", "cancelling", "done", "failed", "cancelled"];

export async function render(_params, page) {
  const filter = page.query.get("status") || "";
  const rows = h("tbody");
  const jobs = pager({
    path: "/v1/jobs",
    params: { status: filter },
    limit: 50,
    list: rows,
    renderItem: jobRow,
    empty: filter ? `No ${filter} jobs.` : "No jobs yet: submit one below.",
  });
  page.onLeave(jobs.stop);

  const statusSelect = h(
    "select",
    {
      id: "status-filter",
      onchange: (e) =>
        (location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : "#/jobs"),
    },
    STATUSES.map((value) =>
      h("option", { value, selected: value === filter }, value || "any status"),
    ),
  );

  page.mount(
    h(
      "div",
      {},
      h("div", { class: "heading" }, h("h1", {}, "Jobs"), h("label", {}, "Status ", statusSelect)),
      h(
        "table",
        { class: "jobs" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            [
              "Job",
              "Status",
              "Source",
              "Items read",
              "Kept",
              "Embedded",
              "Curated",
              "Errors",
              "Created",
            ].map((label) => h("th", { scope: "col" }, label)),
          ),
        ),
        rows,
      ),
      jobs.element,
      await submitForm(),
    ),
    { title: "Jobs", crumbs: [["Jobs"]] },
  );
}

function jobRow(job) {
  const c = job.counts || {};
  return h(
    "tr",
    { dataset: { job: job.job_id } },
    h("th", { scope: "row" }, h("a", { href: route("jobs", job.job_id) }, job.job_id)),
    h("td", {}, status(job.status)),
    h("td", { class: "source", title: job.source }, job.source),
    [c.items_read, c.images_kept, c.images_embedded, c.curated_images, c.errors].map((v) =>
      h("td", { class: "n" }, num(v)),
    ),
    h("td", {}, when(job.created_at)),
  );
}

async function submitForm() {
  let sets = [];
  let setsError = null;
  try {
    sets = (await api("/v1/seed-sets")).items;
  } catch (error) {
    setsError = error;
  }
  const field = (name, label, input, help) =>
    h(
      "div",
      { class: "field", dataset: { field: name } },
      h("label", { for: `job-${name}` }, label),
      input,
      help ? h("p", { class: "muted", id: `job-${name}-help` }, help) : null,
      h("p", { class: "field-error", id: `job-${name}-error`, "aria-live": "polite" }),
    );

  const source = h("input", {
    id: "job-source",
    name: "source",
    required: true,
    placeholder: "/data/crawl, 'shards/*.tar', urls.parquet",
    "aria-describedby": "job-source-help job-source-error",
  });
  const jobId = h("input", {
    id: "job-job_id",
    name: "job_id",
    pattern: "[a-z0-9][a-z0-9_\\-]{0,62}",
    placeholder: "generated when empty",
  });
  const recipe = h(
    "select",
    { id: "job-recipe", name: "recipe" },
    h("option", { value: "" }, "none: the defaults of schemas/job.py"),
    RECIPES.map(([value, label]) => h("option", { value, selected: value === "demo" }, label)),
  );
  const until = h(
    "select",
    { id: "job-until", name: "until" },
    h("option", { value: "" }, "the last stage (curated with seed sets, cluster without)"),
    STAGES.map((stage) => h("option", { value: stage }, stage)),
  );
  const registered = sets.filter((set) => set.registered);
  const presets = sets.filter((set) => !set.registered).map((set) => set.name);
  const seedBoxes = registered.map((set) =>
    h(
      "label",
      { class: "check" },
      h("input", { type: "checkbox", name: "seeds", value: set.name }),
      ` ${set.name} `,
      h("span", { class: "muted" }, `${set.policy || ""}${set.cap ? `, cap ${num(set.cap)}` : ""}`),
    ),
  );
  const seeds = h(
    "fieldset",
    { class: "field", dataset: { field: "seeds" } },
    h("legend", {}, "Seed sets"),
    setsError
      ? errorBox(setsError)
      : seedBoxes.length
        ? seedBoxes
        : h("p", { class: "muted" }, "No seed set registered: the job stops after cluster."),
    // The LVD presets name a policy but no location: one line, not a box each.
    presets.length
      ? h(
          "p",
          { class: "muted" },
          `Presets to register first (curate seeds add NAME PATH): ${presets.join(", ")}.`,
        )
      : null,
    h("p", { class: "field-error", id: "job-seeds-error", "aria-live": "polite" }),
  );
  const extra = h("textarea", {
    id: "job-options",
    name: "options",
    rows: 3,
    placeholder: '{"cluster": {"n_clusters": 20}}',
  });
  const message = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Submit job");
  // One key per filled-in form: a double click or a retried request yields the same job.
  let key = newKey();

  const form = h(
    "form",
    {
      id: "submit-job",
      class: "card",
      novalidate: true,
      onsubmit: send,
      oninput: () => (key = newKey()),
    },
    h("h2", {}, "Submit a job"),
    field(
      "source",
      "Source",
      source,
      "A folder, glob, URL list, WebDataset .tar or Parquet, under the service's source roots.",
    ),
    field("job_id", "Job id", jobId),
    field("recipe", "Recipe", recipe),
    seeds,
    field("until", "Stop after", until),
    h(
      "details",
      {},
      h("summary", {}, "More options (JSON, any JobSpec field)"),
      field(
        "options",
        "Options",
        extra,
        "Merged over the form's fields, e.g. ingest, dedup, cluster sections.",
      ),
    ),
    message,
    submit,
  );

  async function send(event) {
    event.preventDefault();
    for (const el of form.querySelectorAll(".field-error")) el.textContent = "";
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
    message.replaceChildren();
    let body;
    try {
      body = extra.value.trim() ? JSON.parse(extra.value) : {};
      if (typeof body !== "object" || Array.isArray(body)) throw new Error("not a JSON object");
    } catch (error) {
      return showFieldError(form, "options", `Options must be a JSON object: ${error.message}`);
    }
    body.source = source.value.trim();
    if (jobId.value.trim()) body.job_id = jobId.value.trim();
    if (recipe.value) body.recipe = recipe.value;
    if (until.value) body.until = until.value;
    const chosen = [...form.querySelectorAll('input[name="seeds"]:checked')].map(
      (box) => box.value,
    );
    if (chosen.length) body.seeds = chosen;
    if (!body.source) return showFieldError(form, "source", "A source is required.");
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", {
        method: "POST",
        body,
        headers: { "Idempotency-Key": key },
      });
      location.hash = route("jobs", job.job_id);
    } catch (error) {
      // The message names the field; beside the field it need not.
      const text = error.field
        ? error.message.replace(`${error.field}: `, "").replace(`${error.field} `, "")
        : error.message;
      if (!showFieldError(form, fieldName(error.field), text))
        message.replaceChildren(errorBox(error));
    } finally {
      submit.disabled = false;
    }
  }
  return form;
}

// "body.source" -> "source"; "body.cluster.n_clusters" -> the options box, where it was typed.
function fieldName(location) {
  if (!location) return null;
  const parts = location.split(".").filter((part) => part !== "body");
  return ["source", "job_id", "recipe", "seeds", "until"].includes(parts[0]) ? parts[0] : "options";
}

function showFieldError(form, name, text) {
  const box = name && form.querySelector(`[data-field="${name}"]`);
  if (!box) return false;
  const details = box.closest("details");
  if (details) details.open = true;
  box.querySelector(".field-error").textContent = text;
  const input = box.querySelector("input, select, textarea");
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
  return true;
}
