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

