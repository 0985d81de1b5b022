// How the new-job form's text fields become a request body: each knob's text as the JSON
// its schema asks for, and the raw JSON editor merged over the result.
import type { Knob } from "../api/knobs";

/** A knob's text as JSON: blank is left out (server default), numbers are numbers, and
 * anything unparsable is sent as typed so the server names the problem. */
export function knobValue(knob: Knob, text: string): unknown {
  const t = text.trim();
  if (t === "") return undefined;
  if (knob.nullable && t === "null") return null;
  switch (knob.kind) {
    case "integer":
    case "number": {
      const n = Number(t);
      return Number.isFinite(n) ? n : t;
    }
    case "boolean":
      return t === "true" ? true : t === "false" ? false : t;
    case "list":
      return t
        .split(",")
        .map((s) => s.trim())
        .filter(Boolean);
    default:
      return t;
  }
}

/** What a blank knob means, for its placeholder: the server's default where the document
 * declares one (`default: 16`), else a hint of what to type. */
export function knobPlaceholder(knob: Knob): string {
  if (knob.default !== undefined) return `default: ${formatDefault(knob.default)}`;
  if (knob.kind === "list") return "comma-separated";
  return knob.nullable ? "default (or null)" : "default";
}

/** A default as the form's text would spell it: lists comma-separated, `null` as `null`. */
export function formatDefault(value: unknown): string {
  if (Array.isArray(value)) return value.join(", ");
  return value === null ? "null" : String(value);
}

export function knobObject(knobs: Knob[], values: Record<string, string>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const k of knobs) {
    const v = knobValue(k, values[k.name] ?? "");
    if (v !== undefined) out[k.name] = v;
  }
  return out;
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** `extra` over `base`: objects merge key by key, anything else replaces. */
export function deepMerge(base: Record<string, unknown>, extra: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...base };
  for (const [k, v] of Object.entries(extra)) {
    out[k] = isObject(v) && isObject(out[k]) ? deepMerge(out[k] as Record<string, unknown>, v) : v;
  }
  return out;
}

