// A time-series chart over training steps (uPlot: canvas, fast with tens of thousands of
// points). The figure carries its caption and a text summary for screen readers, and its
// point count as `data-points`.
import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { fmtNumber } from "../lib/format";

export interface SeriesSpec {
  label: string;
  color: string;
  /** Points only where the value changes or is sparse (validation loss). */
  points?: boolean;
  dash?: number[];
  stepped?: boolean;
}

export function LineChart(props: {
  id: string;
  title: string;
  series: SeriesSpec[];
  /** x (steps) first, then one array per series, aligned with x; null = no value. */
  data: [number[], ...(number | null)[][]];
  yLabel?: string;
  log?: boolean;
  height?: number;
}) {
  const host = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const xs = props.data[0];

  useEffect(() => {
    const el = host.current;
    if (!el || xs.length === 0) return;
    const width = Math.max(280, el.clientWidth);
    const opts: uPlot.Options = {
      width,
      height: props.height ?? 220,
      scales: { x: { time: false }, y: props.log ? { distr: 3 } : {} },
      axes: [
        { label: "step", stroke: "#52606d", grid: { stroke: "#eef1f5" } },
        { label: props.yLabel, stroke: "#52606d", grid: { stroke: "#eef1f5" }, size: 60, values: (_u, v) => v.map((x) => fmtNumber(x, 3)) },
      ],
      legend: { show: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: "step" },
        ...props.series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 1.75,
          dash: s.dash,
          spanGaps: true,
          points: { show: s.points ?? false, size: 5, fill: s.color },
          paths: s.stepped ? uPlot.paths.stepped!({ align: 1 }) : undefined,
          value: (_u: uPlot, v: number | null) => (v === null || v === undefined ? "–" : fmtNumber(v)),
        })),
      ],
    };
    const u = new uPlot(opts, props.data as uPlot.AlignedData, el);
    plot.current = u;
    const resize = new ResizeObserver(() => {
      const w = Math.max(280, el.clientWidth);
      if (Math.abs(w - u.width) > 2) u.setSize({ width: w, height: props.height ?? 220 });
    });
    resize.observe(el);
    return () => {
      resize.disconnect();
      u.destroy();
      plot.current = null;
    };
    // The chart is built once there is data; later data goes through setData below.
  }, [xs.length === 0, props.series.length]);

  useEffect(() => {
    plot.current?.setData(props.data as uPlot.AlignedData);
  }, [props.data]);

  const last = xs.length ? xs[xs.length - 1] : null;
  const summary =
    last === null
      ? "no points yet"
      : `${xs.length} points up to step ${last}; latest ` +
        props.series.map((s, i) => `${s.label} ${fmtNumber(lastValue(props.data[i + 1] as (number | null)[]))}`).join(", ");
  return (
    <figure class="chart" data-testid={`chart-${props.id}`} data-points={xs.length}>
      <figcaption id={`chart-${props.id}-title`}>{props.title}</figcaption>
      <p class="visually-hidden">{summary}</p>
      {xs.length === 0 ? (
        <div class="empty">Waiting for the first step…</div>
      ) : (
        <div class="plot" ref={host} />
      )}
    </figure>
  );
}

function lastValue(values: (number | null)[]): number | null {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}
