// A job's events folded into what its page draws: the training series (loss, learning
// rate, grad norm, tokens/s by step), validation losses, the rank allocations of adaptive
// methods, the safety report and the latest status. Fed one event at a time, as the
// stream delivers them.
import type { EventView, Schemas } from "../api/client";

export interface RankSnapshot {
  step: number;
  total: number;
  budget: number | null;
  sparsity: number | null;
  perModule: Record<string, number>;
}

export class JobSeries {
  steps: number[] = [];
  loss: number[] = [];
  lr: number[] = [];
  gradNorm: (number | null)[] = [];
  tokensPerSecond: number[] = [];
  totalSteps: number | null = null;
  etaSeconds: number | null = null;
  evals = new Map<number, number>();
  ranks: RankSnapshot[] = [];
  safety: Schemas["SafetyReport"] | null = null;
  status: Schemas["JobStatus"] | null = null;
  statusMessage: string | null = null;
  events: EventView[] = [];
  lastSeq = 0;

  add(e: EventView) {
    if (e.seq <= this.lastSeq) return;
    this.lastSeq = e.seq;
    this.events.push(e);
    switch (e.kind) {
      case "progress": {
        // A retried attempt resumes from a checkpoint and reports those steps again: its
        // numbers replace the first attempt's from there on.
        let cut = this.steps.length;
        while (cut > 0 && this.steps[cut - 1] >= e.step) cut--;
        if (cut < this.steps.length) {
          for (const a of [this.steps, this.loss, this.lr, this.gradNorm, this.tokensPerSecond]) a.length = cut;
        }
        this.steps.push(e.step);
        this.loss.push(e.loss);
        this.lr.push(e.lr);
        this.gradNorm.push(e.grad_norm ?? null);
        this.tokensPerSecond.push(e.tokens_per_second);
        this.totalSteps = e.total_steps;
        this.etaSeconds = e.eta_seconds ?? null;
        break;
      }
      case "eval":
        this.evals.set(e.step, e.loss);
        break;
      case "ranks":
        while (this.ranks.length && this.ranks[this.ranks.length - 1].step >= e.step) this.ranks.pop();
        this.ranks.push({ step: e.step, total: e.total, budget: e.budget ?? null, sparsity: e.sparsity ?? null, perModule: e.per_module });
        break;
      case "safety":
        this.safety = e.report;
        break;
      case "status":
        this.status = e.status;
        this.statusMessage = e.message ?? null;
        break;
    }
  }

  /** x = progress steps; train loss; validation loss where one was measured at that step. */
  lossData(): [number[], (number | null)[], (number | null)[]] {
    return [this.steps.slice(), this.loss.slice(), this.steps.map((s) => this.evals.get(s) ?? null)];
  }

  rankTotals(): [number[], (number | null)[], (number | null)[]] {
    return [this.ranks.map((r) => r.step), this.ranks.map((r) => r.total), this.ranks.map((r) => r.budget)];
  }

  /** Every module any allocation named, in a stable order. */
  rankModules(): string[] {
    const all = new Set<string>();
    for (const r of this.ranks) for (const m of Object.keys(r.perModule)) all.add(m);
    return [...all].sort(compareModules);
  }
}

/** `layers.10` after `layers.9`: numbers compare as numbers. */
export function compareModules(a: string, b: string): number {
  return a.localeCompare(b, "en", { numeric: true });
}

/** A module path without the wrapper prefixes every module shares. */
export function shortModule(path: string): string {
  return path.replace(/^(base_model\.)?(model\.)+/, "").replace(/^layers\./, "L");
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
export const isFinal = (status: string | null | undefined) => status !== null && status !== undefined && FINAL.has(status);
