// After `vite build`: writes a gzip twin of every asset (the control plane sends it to
// browsers that accept gzip), then measures the first page, what a browser downloads to
// show `/` (index.html, the entry chunk and everything it imports, its CSS, and the jobs
// page it opens on), gzipped, and fails the build above the budget. The numbers go to
// dist/size.json and the console; the README's UI section quotes them.
import { gzipSync } from "node:zlib";
import { readFileSync, readdirSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const BUDGET_BYTES = 200 * 1000;
const FIRST_ROUTE = "src/pages/Jobs.tsx";

const dist = fileURLToPath(new URL("../dist/", import.meta.url));
const manifest = JSON.parse(readFileSync(`${dist}.vite/manifest.json`, "utf8"));

const gzipped = new Map();
for (const name of readdirSync(`${dist}assets`)) {
  if (name.endsWith(".gz")) continue;
  const raw = readFileSync(`${dist}assets/${name}`);
  const gz = gzipSync(raw, { level: 9 });
  writeFileSync(`${dist}assets/${name}.gz`, gz);
  gzipped.set(`assets/${name}`, { raw: raw.length, gz: gz.length });
}

/** Every file a chunk needs before it runs: itself, its static imports, their CSS. */
function closure(key, files = new Set()) {
  const chunk = manifest[key];
  if (!chunk || files.has(chunk.file)) return files;
  files.add(chunk.file);
  for (const css of chunk.css ?? []) files.add(css);
  for (const imported of chunk.imports ?? []) closure(imported, files);
  return files;
}

const files = closure("index.html");
closure(FIRST_ROUTE, files);
const html = readFileSync(`${dist}index.html`);
let raw = html.length;
let gz = gzipSync(html, { level: 9 }).length;
for (const f of files) {
  raw += gzipped.get(f).raw;
  gz += gzipped.get(f).gz;
}
const all = [...gzipped.values()].reduce((s, x) => s + x.gz, 0);
const report = {
  first_page: { files: ["index.html", ...[...files].sort()], bytes: raw, gzip_bytes: gz },
  all_assets_gzip_bytes: all,
  budget_gzip_bytes: BUDGET_BYTES,
};
writeFileSync(`${dist}size.json`, JSON.stringify(report, null, 2) + "\n");
const kb = (n) => `${(n / 1000).toFixed(1)} KB`;
console.log(`first page: ${kb(gz)} gzipped (${kb(raw)} raw, ${files.size + 1} files); all assets ${kb(all)} gzipped; budget ${kb(BUDGET_BYTES)}`);
if (gz > BUDGET_BYTES) {
  console.error(`the first page is over its budget of ${kb(BUDGET_BYTES)} gzipped`);
  process.exit(1);
}
