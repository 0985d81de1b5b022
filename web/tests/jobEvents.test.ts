import { describe, expect, it } from "vitest";
import type { EventView } from "../src/api/client";
import { JobSeries, shortModule } from "../src/lib/jobEvents";

let seq = 0;
const at = "2026-01-01T00:00:00Z";
const progress = (step: number, loss: number): EventView =>
  ({ seq: ++seq, created_at: at, kind: "progress", step, total_steps: 6, loss, lr: 0.001, tokens_per_second: 100, eta_seconds: 1, grad_norm: 0.5 }) as EventView;

describe("JobSeries", () => {
  it("lets a resumed attempt's steps replace the first attempt's from its checkpoint on", () => {
    const s = new JobSeries();
    for (const [step, loss] of [[1, 3], [2, 2.5], [3, 2.2], [4, 2.0]]) s.add(progress(step, loss));
    // The second attempt resumes from the checkpoint at step 2.
    for (const [step, loss] of [[3, 2.3], [4, 2.1], [5, 1.9]]) s.add(progress(step, loss));
    expect(s.steps).toEqual([1, 2, 3, 4, 5]);
    expect(s.loss).toEqual([3, 2.5, 2.3, 2.1, 1.9]);
    expect(s.gradNorm).toHaveLength(5);
  });

  it("ignores an event it has already seen and aligns validation losses with steps", () => {
    const s = new JobSeries();
    const first = progress(1, 3);
    s.add(first);
    s.add(first);
    s.add(progress(2, 2.5));
    s.add({ seq: ++seq, created_at: at, kind: "eval", step: 2, loss: 2.7, tokens: 10 } as EventView);
    expect(s.events).toHaveLength(3);
    expect(s.lossData()).toEqual([[1, 2], [3, 2.5], [null, 2.7]]);
  });

  it("keeps rank allocations by step and lists their modules in layer order", () => {
    const s = new JobSeries();
    const ranks = (step: number, perModule: Record<string, number>) =>
      ({ seq: ++seq, created_at: at, kind: "ranks", step, total: 0, budget: 8, per_module: perModule, sparsity: null }) as EventView;
    s.add(ranks(5, { "model.layers.10.q": 2, "model.layers.9.q": 4 }));
    s.add(ranks(7, { "model.layers.10.q": 1, "model.layers.9.q": 3 }));
    expect(s.ranks.map((r) => r.step)).toEqual([5, 7]);
    expect(s.rankModules()).toEqual(["model.layers.9.q", "model.layers.10.q"]);
    expect(shortModule("base_model.model.model.layers.3.self_attn.q_proj")).toBe("L3.self_attn.q_proj");
  });
});
