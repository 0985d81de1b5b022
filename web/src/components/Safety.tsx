// The safety gate's report (base vs adapted) and, once published, its verdict.
import type { Schemas } from "../api/client";
import { fmtNumber, fmtPercent } from "../lib/format";
import { shortModule, compareModules } from "../lib/jobEvents";
import { StatusBadge, Stats } from "./ui";

export function SafetyReport({ report, verdict }: { report: Schemas["SafetyReport"]; verdict?: Schemas["SafetyVerdict"] | null }) {
  const intruders = Object.entries(report.intruder_dimensions ?? {})
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1] || compareModules(a[0], b[0]));
  const categories = Object.entries(report.refusal_rate_by_category ?? {}).sort();
  return (
    <div data-testid="safety-report">
      {verdict && (
        <p>
          Decision: <StatusBadge status={verdict.decision} />
          {verdict.breaches.length > 0 && <span class="muted"> — {verdict.breaches.join("; ")}</span>}
        </p>
      )}
      {!verdict && <p class="muted small">The decision is made when the version is published.</p>}
      <h3>Refusal rate on {report.harmful_prompts} harmful requests</h3>
      <div class="bars" role="list">
        <Bar label="base" value={report.refusal_rate_base} />
        <Bar label="adapted" value={report.refusal_rate_adapted} adapted />
      </div>
      <div style={{ marginTop: "0.75rem" }}>
        <Stats
          items={[
            ["Benign drift (KL)", fmtNumber(report.benign_kl_mean)],
            ["Perplexity", `${fmtNumber(report.perplexity_base)} → ${fmtNumber(report.perplexity_adapted)}`],
            ["Intruder dims", report.intruder_dimensions_total],
            ["Benign prompts", report.benign_prompts],
            ["Evaluation time", `${fmtNumber(report.seconds, 3)} s`],
          ]}
        />
      </div>
      <p class="muted small">Refusals judged by {report.judge}.</p>
      {categories.length > 0 && (
        <details>
          <summary>Refusal rate by category (adapted)</summary>
          <table>
            <tbody>
              {categories.map(([c, r]) => (
                <tr key={c}>
                  <th scope="row">{c}</th>
                  <td class="num">{fmtPercent(r)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </details>
      )}
      {intruders.length > 0 && (
        <details>
          <summary>Intruder dimensions by module</summary>
          <table>
            <tbody>
              {intruders.map(([m, n]) => (
                <tr key={m}>
                  <th scope="row" class="mono">
                    {shortModule(m)}
                  </th>
                  <td class="num">{n}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </details>
      )}
    </div>
  );
}

function Bar({ label, value, adapted }: { label: string; value: number; adapted?: boolean }) {
  return (
    <div class="bar-row" role="listitem">
      <span>{label}</span>
      <div class="bar-track" aria-hidden="true">
        <div class={`bar-fill${adapted ? " adapted" : ""}`} style={{ width: `${Math.min(100, value * 100)}%` }} />
      </div>
      <span class="num">{fmtPercent(value)}</span>
    </div>
  );
}
