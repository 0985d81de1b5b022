import { describe, expect, it } from "vitest";
import { rankOf } from "../src/lib/peft";

describe("rankOf", () => {
  it("reads a module's own rank, else the default for targeted modules, else none", () => {
    const config = { r: 8, target_modules: ["q_proj", "v_proj"], rank_pattern: { "model.layers.0.self_attn.q_proj": 3 } };
    expect(rankOf(config, "model.layers.0.self_attn.q_proj")).toBe(3);
    expect(rankOf(config, "model.layers.1.self_attn.v_proj")).toBe(8);
    expect(rankOf(config, "model.layers.0.mlp.down_proj")).toBeNull();
    expect(rankOf(null, "x")).toBeNull();
  });
});
