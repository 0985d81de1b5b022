// How numbers, times and sizes read in the UI.

export function fmtNumber(n: number | null | undefined, digits = 4): string {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  if (n === 0) return "0";
  const abs = Math.abs(n);
  if (abs >= 1e5 || abs < 1e-3) return n.toExponential(2);
  return Number(n.toPrecision(digits)).toString();
}

export function fmtInt(n: number | null | undefined): string {
  if (n === null || n === undefined) return "–";
  return Math.round(n).toLocaleString("en-US");
}

export function fmtPercent(x: number | null | undefined): string {
  if (x === null || x === undefined) return "–";
  return `${(x * 100).toFixed(1)}%`;
}

export function fmtBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

export function fmtDuration(seconds: number | null | undefined): string {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${m % 60}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

/** "3m ago", against `now`. */
export function fmtAge(iso: string, now = Date.now()): string {
  const seconds = (now - Date.parse(iso)) / 1000;
  return seconds < 5 ? "just now" : `${fmtDuration(seconds)} ago`;
}

export function fmtTime(iso: string | null | undefined): string {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString("en-GB", { dateStyle: "medium", timeStyle: "medium" });
}

/** The last path segment of a URI, which names a model or a file well enough for a table. */
export function shortUri(uri: string): string {
  const trimmed = uri.replace(/\/+$/, "");
  const last = trimmed.slice(trimmed.lastIndexOf("/") + 1);
  return last || uri;
}

export function shortSha(sha: string | null | undefined): string {
  return sha ? sha.slice(0, 12) : "–";
}

/** Any JSON value in one line (settings tables). */
export function fmtValue(v: unknown): string {
  if (v === null || v === undefined) return "null";
  if (typeof v === "number") return fmtNumber(v, 6);
  if (typeof v === "string") return v;
  return JSON.stringify(v);
}
