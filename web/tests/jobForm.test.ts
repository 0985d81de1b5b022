import { describe, expect, it } from "vitest";
import type { Knob } from "../src/api/knobs";
import { KNOBS } from "../src/api/knobs.gen";
import { deepMerge, knobObject, knobPlaceholder, knobValue } from "../src/lib/jobForm";

const knob = (kind: Knob["kind"], nullable = false): Knob => ({ name: "k", kind, nullable, required: false, description: "" });

describe("knobValue", () => {
  it("leaves a blank knob to the server's default and converts the rest by kind", () => {
    expect(knobValue(knob("integer"), "  ")).toBeUndefined();
    expect(knobValue(knob("integer"), "8")).toBe(8);
    expect(knobValue(knob("number"), "2e-4")).toBe(0.0002);
    expect(knobValue(knob("boolean"), "false")).toBe(false);
    expect(knobValue(knob("list"), "q_proj, v_proj,")).toEqual(["q_proj", "v_proj"]);
    expect(knobValue(knob("integer", true), "null")).toBeNull();
  });

  it("sends what it cannot convert as typed, for the server to name the field", () => {
    expect(knobValue(knob("integer"), "eight")).toBe("eight");
    expect(knobValue(knob("integer"), "null")).toBe("null");
  });

  it("builds an object of the filled knobs only", () => {
    const knobs: Knob[] = [
      { ...knob("integer"), name: "r" },
      { ...knob("number"), name: "alpha" },
    ];
    expect(knobObject(knobs, { r: "4", alpha: "" })).toEqual({ r: 4 });
  });
});

describe("deepMerge", () => {
  it("merges objects key by key and replaces everything else", () => {
    const form = { method: { type: "lora", r: 8 }, training: { max_steps: 10 }, dataset: { train: "a" } };
    const extra = { method: { use_rslora: true }, training: { max_steps: 20 }, dataset: "replaced", safety: { enabled: false } };
    expect(deepMerge(form, extra)).toEqual({
      method: { type: "lora", r: 8, use_rslora: true },
      training: { max_steps: 20 },
      dataset: "replaced",
      safety: { enabled: false },
    });
    expect(form.training.max_steps).toBe(10);
  });
});

describe("knobPlaceholder", () => {
  it("shows the server's default where the document declares one, else a hint", () => {
    expect(knobPlaceholder({ ...knob("number"), default: 16 })).toBe("default: 16");
    expect(knobPlaceholder({ ...knob("list"), default: ["q_proj", "v_proj"] })).toBe("default: q_proj, v_proj");
    expect(knobPlaceholder({ ...knob("integer", true), default: null })).toBe("default: null");
    expect(knobPlaceholder(knob("list"))).toBe("comma-separated");
    expect(knobPlaceholder(knob("integer", true))).toBe("default (or null)");
  });

  it("knows the methods' defaults from the API document", () => {
    // Every method targets some modules by default; a knob whose absence the server works
    // out from others (IncreLoRA's `target_total_rank`) declares none and shows "default".
    for (const method of KNOBS.methods) {
      const targets = method.knobs.find((k) => k.name === "target_modules");
      expect(targets?.default, method.type).toEqual(expect.arrayContaining([expect.any(String)]));
    }
    const lora = KNOBS.methods.find((m) => m.type === "lora")!;
    expect(typeof lora.knobs.find((k) => k.name === "alpha")?.default).toBe("number");
    expect(lora.knobs.find((k) => k.name === "r")).toMatchObject({ required: true });
    expect(lora.knobs.find((k) => k.name === "r")?.default).toBeUndefined();
  });
});
