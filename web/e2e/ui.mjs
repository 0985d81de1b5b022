// The web UI end to end, in headless Chromium (playwright-core; Debian's chromium), against a
// real control plane, Postgres and trainer: tests/tests/web_ui.rs starts them, registers the
// fixture model and dataset, creates an admin key and runs this script, which fails (exit 1)
// on the first broken expectation. Along the way it checks every page with axe-core (no
// serious or critical violation), fails on any script error or CSP violation, and saves a
// screenshot of every page into web/screenshots/.
//
// Environment: LF_URL, LF_KEY (admin), LF_BASE_MODEL and LF_DATASET (registered names),
// LF_SCREENSHOTS (directory), CHROMIUM (default /usr/bin/chromium).
import { chromium } from "playwright-core";
import { createHash } from "node:crypto";
import { mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`${name} is not set`);
  return v;
};
const BASE = env("LF_URL").replace(/\/$/, "");
const KEY = env("LF_KEY");
const BASE_MODEL = env("LF_BASE_MODEL");
const DATASET = env("LF_DATASET");
const SHOTS = env("LF_SCREENSHOTS");
const CHROMIUM = env("CHROMIUM", "/usr/bin/chromium");
const ADAPTER = "ui-demo";

const started = Date.now();
const log = (...args) => console.log(`[ui ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);

function check(condition, message) {
  if (!condition) throw new Error(`expectation failed: ${message}`);
}

/** The public API, for cross-checks the page cannot be trusted with. */
async function apiGet(path) {
  const r = await fetch(`${BASE}${path}`, { headers: { Authorization: `Bearer ${KEY}` } });
  if (!r.ok) throw new Error(`GET ${path} answered ${r.status}: ${await r.text()}`);
  return r.json();
}

const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");
const axeReport = [];

/** axe-core on the page as it is now: serious and critical violations fail the run. */
async function accessibility(page, name) {
  // Evaluated through the DevTools protocol, which the page's CSP does not govern.
  await page.evaluate(axeSource);
  const result = await page.evaluate(() =>
    // eslint-disable-next-line no-undef
    axe.run(document, { resultTypes: ["violations"] }),
  );
  const violations = result.violations.map((v) => ({
    id: v.id,
    impact: v.impact,
    help: v.help,
    nodes: v.nodes.slice(0, 3).map((n) => n.target.join(" ")),
  }));
  axeReport.push({ page: name, violations });
  const blocking = violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  for (const v of violations) log(`axe ${name}: ${v.impact} ${v.id} (${v.help}) at ${v.nodes.join(", ")}`);
  check(blocking.length === 0, `${name}: ${blocking.length} serious/critical accessibility violations: ${JSON.stringify(blocking, null, 2)}`);
}

async function shot(page, name) {
  await page.waitForTimeout(150); // let charts finish their frame
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
  log(`screenshot ${name}.png`);
}

/** Both: axe, then the screenshot. */
async function visit(page, name) {
  await accessibility(page, name);
  await shot(page, name);
}

async function waitForText(locator, re, timeout = 30_000) {
  await locator.filter({ hasText: re }).first().waitFor({ timeout });
}

async function fillKnob(page, path, value) {
  const field = page.locator(`[data-field="${path}"]`).locator("input, select").first();
  if ((await field.evaluate((el) => el.tagName)) === "SELECT") await field.selectOption(value);
  else await field.fill(value);
}

async function main() {
  mkdirSync(SHOTS, { recursive: true });
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const context = await browser.newContext({ viewport: { width: 1360, height: 900 }, acceptDownloads: true, deviceScaleFactor: 1 });
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // Refused requests are part of the script (a wrong key, a bad form); anything else is not.
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(`console: ${m.text()}`);
  });

  try {
    // --- Sign in: a wrong key is refused with the server's message, the right one works.
    await page.goto(`${BASE}/`);
    await page.getByRole("heading", { name: "Sign in", exact: true }).waitFor();
    await visit(page, "signin");
    await page.getByLabel("API key", { exact: true }).fill("lf_00000000_wrong");
    await page.getByRole("button", { name: "Sign in" }).click();
    await waitForText(page.locator(".field-error"), /missing or invalid credentials/);
    await page.getByLabel("API key", { exact: true }).fill(KEY);
    await page.getByRole("button", { name: "Sign in" }).click();
    await page.getByRole("heading", { name: "Jobs", exact: true }).waitFor();
    await page.getByText("No jobs yet").waitFor();
    check((await page.getByTestId("whoami").textContent()).includes("admin"), "the header names the key's scope");
    await visit(page, "jobs-empty");
    log("signed in");

    // --- A bad form: the server's field errors appear next to the fields they name.
    await page.getByRole("link", { name: "New job", exact: true }).first().click();
    await page.getByRole("heading", { name: "New job", exact: true }).waitFor();
    await page.getByLabel("Adapter name", { exact: true }).fill(ADAPTER);
    // The registered inputs arrive with their own requests.
    await page.locator(`#f-base_model option[value="${BASE_MODEL}"]`).waitFor({ state: "attached" });
    await page.locator(`#f-dataset-train option[value="${DATASET}"]`).waitFor({ state: "attached" });
    check((await page.getByLabel("Base model", { exact: true }).inputValue()) === BASE_MODEL, "the registered base model is preselected");
    check((await page.getByLabel("Training data", { exact: true }).inputValue()) === DATASET, "the registered dataset is preselected");
    await fillKnob(page, "method.r", "0");
    await fillKnob(page, "training.learning_rate", "-1");
    await page.getByTestId("submit-job").click();
    await page.getByTestId("error-summary").waitFor();
    const rError = await page.locator('[data-error-for="method.r"]').textContent();
    const lrError = await page.locator('[data-error-for="training.learning_rate"]').textContent();
    check(/between 1 and/.test(rError), `method.r shows its error: ${rError}`);
    check(/positive/.test(lrError), `training.learning_rate shows its error: ${lrError}`);
    check((await page.locator("#f-method-r").getAttribute("aria-invalid")) === "true", "the bad field is marked invalid");
    await visit(page, "new-job-errors");
    log("field errors shown:", rError, "|", lrError);

    // --- The good form, double-clicked: one job. Validation held out, evaluated every 50 steps.
    // Long enough to train for several seconds on a fast machine (packed rows of 8 x 128
    // tokens), so the chart is seen growing.
    const STEPS = 500;
    await fillKnob(page, "method.r", "8");
    await fillKnob(page, "training.learning_rate", "0.001");
    await fillKnob(page, "training.max_steps", String(STEPS));
    await fillKnob(page, "training.batch_size", "8");
    await fillKnob(page, "training.seq_len", "128");
    await fillKnob(page, "training.packing", "true");
    await fillKnob(page, "training.eval_every", "50");
    await fillKnob(page, "training.checkpoint_every", "null");
    await page.getByLabel("Validation", { exact: true }).selectOption("fraction");
    await page.getByTestId("submit-job").dblclick();
    await page.waitForURL(/#\/jobs\/[0-9a-f-]{36}$/);
    const jobId = page.url().split("/").pop();
    log("submitted job", jobId);

    // --- Watch the loss chart gain points while the job runs, then the job succeed.
    const status = () => page.getByTestId("job-status").textContent();
    const points = async () => Number((await page.getByTestId("chart-loss").getAttribute("data-points")) ?? 0);
    const whileRunning = [];
    for (let i = 0; i < 1200; i++) {
      const s = (await status()).trim();
      if (s === "running") whileRunning.push(await points());
      if (["succeeded", "failed", "cancelled"].includes(s)) break;
      await page.waitForTimeout(100);
    }
    const distinct = [...new Set(whileRunning)].filter((n) => n > 0);
    check(distinct.length >= 2 && distinct[distinct.length - 1] > distinct[0], `the loss chart gained points while running: ${JSON.stringify(distinct)}`);
    await waitForText(page.getByTestId("job-status"), /succeeded/, 240_000);
    await page.getByTestId("safety-report").waitFor();
    await page.getByTestId("stream-state").and(page.locator('[data-state="ended"]')).waitFor();
    check((await points()) === STEPS, `the loss chart has every step: ${await points()}`);
    const validation = await page.getByTestId("chart-loss").locator(".visually-hidden").textContent();
    check(/validation \d/.test(validation), `the loss chart has validation losses: ${validation}`);
    check(Number(await page.getByTestId("chart-grad-norm").getAttribute("data-points")) === STEPS, "grad norm is charted");
    await visit(page, "job-detail");
    log("job succeeded; loss points seen while running:", distinct.join(","));

    const jobs = await apiGet(`/v1/jobs?adapter=${ADAPTER}`);
    check(jobs.jobs.length === 1, `the double click made one job, not ${jobs.jobs.length}`);

    // --- An adaptive method: its rank allocation as a heatmap. Followed from the live jobs table.
    await page.goto(`${BASE}/#/jobs/new?adapter=${ADAPTER}&method=adalora`);
    await page.getByRole("heading", { name: "New job", exact: true }).waitFor();
    check((await page.getByLabel("Adapter method", { exact: true }).inputValue()) === "adalora", "the method comes from the link");
    for (const [k, v] of Object.entries({ init_r: "6", target_r: "2", tinit: "5", tfinal: "10", delta_t: "2", target_modules: "q_proj, v_proj, down_proj" })) {
      await fillKnob(page, `method.${k}`, v);
    }
    await fillKnob(page, "training.max_steps", "40");
    await fillKnob(page, "training.learning_rate", "0.005");
    await fillKnob(page, "training.seq_len", "64");
    await page.getByTestId("submit-job").click();
    await page.waitForURL(/#\/jobs\/[0-9a-f-]{36}$/);
    const adaptiveId = page.url().split("/").pop();
    await page.getByRole("navigation", { name: "Main" }).getByRole("link", { name: "Jobs", exact: true }).click();
    const row = page.locator(`tr[data-job-id="${adaptiveId}"]`);
    await row.waitFor();
    // The table refreshes on its own: the row reaches its final state without a reload.
    await row.and(page.locator('[data-status="succeeded"]')).waitFor({ timeout: 240_000 });
    await page.locator('tr[data-job-id] a').first().waitFor();
    await visit(page, "jobs");
    await row.getByRole("link", { name: ADAPTER }).click();
    await page.getByTestId("rank-heatmap").waitFor();
    const modules = Number(await page.getByTestId("rank-heatmap").getAttribute("data-modules"));
    const snapshots = Number(await page.getByTestId("rank-heatmap").getAttribute("data-snapshots"));
    check(modules > 0 && snapshots > 1, `the heatmap has modules (${modules}) and allocations (${snapshots})`);
    await page.getByTestId("chart-rank-budget").waitFor();
    await visit(page, "job-adaptive");
    log(`adaptive job ${adaptiveId}: heatmap of ${modules} modules x ${snapshots} allocations`);

    // --- The version: files with digests; a download matches the registry's sha256.
    await page.getByTestId("version-link").click();
    await page.getByTestId("files-table").waitFor();
    const version = await apiGet(`/v1/adapters/${ADAPTER}/versions/2`);
    const file = version.files.find((f) => f.name === "adapter_model.safetensors");
    const shown = (await page.locator(`tr[data-file="${file.name}"] [data-testid="sha256"]`).textContent()).trim();
    check(shown === file.sha256, "the page shows the registry's digest");
    const [download] = await Promise.all([
      page.waitForEvent("download"),
      page.getByRole("button", { name: `Download ${file.name}` }).click(),
    ]);
    const saved = join(mkdtempSync(join(tmpdir(), "lf-ui-")), file.name);
    await download.saveAs(saved);
    const bytes = readFileSync(saved);
    const digest = createHash("sha256").update(bytes).digest("hex");
    check(digest === file.sha256 && bytes.length === file.size, `the downloaded file's sha256 ${digest} is the registry's ${file.sha256}`);
    log("downloaded", file.name, bytes.length, "bytes, sha256 matches");

    // A tag, added by an admin.
    await page.getByLabel("Add a tag", { exact: true }).fill("candidate");
    await page.getByRole("button", { name: "Add tag" }).click();
    await page.getByTestId("tags").getByText("candidate").waitFor();
    await visit(page, "version");

    // --- Aliases: create prod -> v1, then move it to v2.
    await page.getByRole("navigation", { name: "Breadcrumb" }).getByRole("link", { name: ADAPTER }).click();
    await page.getByTestId("versions-table").waitFor();
    await page.getByLabel("Alias", { exact: true }).fill("prod");
    await page.getByLabel("Version", { exact: true }).selectOption("1");
    await page.getByRole("button", { name: "Set alias" }).click();
    await waitForText(page.getByTestId("alias-prod-target"), /v1/);
    await page.getByLabel("Move prod to version", { exact: true }).selectOption("2");
    await page.getByRole("button", { name: "Move prod" }).click();
    await waitForText(page.getByTestId("alias-prod-target"), /v2/);
    const resolved = await apiGet(`/v1/adapters/${ADAPTER}/resolve?ref=prod`);
    check(resolved.version === 2, `prod resolves to v2 on the server: ${JSON.stringify(resolved)}`);
    await visit(page, "adapter");
    log("alias prod moved to v2");

    // --- Compare v1 (lora) with v2 (adalora): rank patterns side by side.
    await page.getByRole("checkbox", { name: "Compare version 1" }).check();
    await page.getByRole("checkbox", { name: "Compare version 2" }).check();
    await page.getByRole("button", { name: "Compare selected" }).click();
    await page.getByTestId("rank-patterns").waitFor();
    check((await page.locator('[data-testid="comparison"] tr[data-differs="true"]').count()) > 0, "the comparison marks differences");
    await visit(page, "compare");

    // --- The registry list, filtered by method.
    await page.goto(`${BASE}/#/adapters?method=adalora`);
    await page.getByTestId("adapters-table").getByRole("link", { name: ADAPTER }).waitFor();
    await visit(page, "adapters");

    // --- Lineage of v2: the graph, and a node followed to its page.
    await page.goto(`${BASE}/#/adapters/${ADAPTER}/versions/2`);
    await page.getByTestId("lineage-link").click();
    await page.getByTestId("lineage-graph").waitFor();
    const nodeTypes = await page.locator("[data-node-type]").evaluateAll((els) => els.map((e) => e.getAttribute("data-node-type")));
    for (const t of ["base_model", "dataset", "job", "adapter_version"]) check(nodeTypes.includes(t), `the lineage has a ${t} node: ${nodeTypes}`);
    await visit(page, "lineage");
    await page.locator('[data-node-type="job"]').first().focus();
    await page.keyboard.press("Enter");
    await page.waitForURL(new RegExp(`#/jobs/${adaptiveId}$`));
    await page.getByTestId("job-status").waitFor();
    log("followed the job node to its page");

    // --- A key the server stops accepting: the next request returns to sign-in with its message.
    await page.evaluate(() => {
      sessionStorage.setItem("loraforge.api-key", "lf_00000000_revoked");
      location.hash = "#/adapters";
    });
    await page.getByRole("heading", { name: "Sign in", exact: true }).waitFor();
    await waitForText(page.getByRole("alert"), /refused the request: missing or invalid credentials/);
    log("a refused key returns to sign-in with the server's message");

    check(problems.length === 0, `the page logged errors:\n${problems.join("\n")}`);
    log(`done: ${axeReport.length} pages checked by axe`);
  } catch (e) {
    const failure = join(tmpdir(), "loraforge-ui-failure.png");
    await page.screenshot({ path: failure, fullPage: true }).catch(() => {});
    console.error(`the page at the failure: ${failure} (${page.url()})`);
    if (problems.length) console.error(`page errors:\n${problems.join("\n")}`);
    throw e;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
