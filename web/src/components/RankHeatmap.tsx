// The rank allocation of an adaptive method as a heatmap: one row per adapted module, time
// (step) across, colour = the module's rank from that allocation until the next. A table of
// the latest allocation stands in for it for screen readers.
import { useEffect, useRef } from "preact/hooks";
import type { RankSnapshot } from "../lib/jobEvents";
import { shortModule } from "../lib/jobEvents";

const LOW = [243, 246, 255];
const HIGH = [33, 49, 140];

function colour(t: number): string {
  const c = LOW.map((l, i) => Math.round(l + (HIGH[i] - l) * t));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

export function RankHeatmap(props: { ranks: RankSnapshot[]; modules: string[]; lastStep: number }) {
  const canvas = useRef<HTMLCanvasElement>(null);
  const { ranks, modules } = props;
  const maxRank = Math.max(1, ...ranks.flatMap((r) => Object.values(r.perModule)));
  const endStep = Math.max(props.lastStep, ranks.length ? ranks[ranks.length - 1].step : 0);
  const rowHeight = Math.max(3, Math.min(18, Math.floor(420 / Math.max(1, modules.length))));
  const labels = rowHeight >= 10;
  const labelWidth = labels ? 170 : 0;
  const height = modules.length * rowHeight + 24;

  useEffect(() => {
    const c = canvas.current;
    if (!c || ranks.length === 0) return;
    const cssWidth = c.clientWidth || 600;
    const dpr = window.devicePixelRatio || 1;
    c.width = cssWidth * dpr;
    c.height = height * dpr;
    const ctx = c.getContext("2d")!;
    ctx.scale(dpr, dpr);
    ctx.clearRect(0, 0, cssWidth, height);
    const plotWidth = cssWidth - labelWidth - 8;
    const first = ranks[0].step;
    const span = Math.max(1, endStep - first);
    const x = (step: number) => labelWidth + ((step - first) / span) * plotWidth;
    ranks.forEach((r, i) => {
      const x0 = x(r.step);
      const x1 = i + 1 < ranks.length ? x(ranks[i + 1].step) : x(endStep);
      modules.forEach((m, row) => {
        const rank = r.perModule[m] ?? 0;
        ctx.fillStyle = colour(rank / maxRank);
        ctx.fillRect(x0, row * rowHeight, Math.max(1, x1 - x0 + 0.5), rowHeight - (rowHeight > 4 ? 1 : 0));
      });
    });
    ctx.fillStyle = "#1f2933";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    if (labels) modules.forEach((m, row) => ctx.fillText(shortModule(m).slice(0, 26), 2, row * rowHeight + rowHeight / 2));
    ctx.fillStyle = "#52606d";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(`step ${first}`, labelWidth, height - 6);
    const endLabel = `step ${endStep}`;
    ctx.fillText(endLabel, cssWidth - ctx.measureText(endLabel).width - 4, height - 6);
  });

  const latest = ranks[ranks.length - 1];
  return (
    <figure class="chart heatmap" data-testid="rank-heatmap" data-modules={modules.length} data-snapshots={ranks.length}>
      <figcaption id="heatmap-title">Rank per module over steps</figcaption>
      <canvas
        ref={canvas}
        style={{ height: `${height}px` }}
        role="img"
        aria-labelledby="heatmap-title"
        aria-describedby="heatmap-summary"
      />
      <p id="heatmap-summary" class="visually-hidden">
        {modules.length} modules, {ranks.length} allocations from step {ranks[0]?.step} to {endStep}; the latest total rank is {latest?.total}.
      </p>
      <div class="legend-scale" aria-hidden="true">
        <span>0</span>
        <span class="bar" style={{ background: `linear-gradient(90deg, ${colour(0)}, ${colour(1)})` }} />
        <span>{maxRank}</span>
      </div>
      <details>
        <summary>Latest allocation (step {latest?.step}) as a table</summary>
        <div class="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Module</th>
                <th scope="col" class="num">
                  Rank
                </th>
              </tr>
            </thead>
            <tbody>
              {modules.map((m) => (
                <tr key={m}>
                  <td class="mono">{m}</td>
                  <td class="num">{latest?.perModule[m] ?? 0}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </details>
    </figure>
  );
}
