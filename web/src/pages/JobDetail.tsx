// One job, live: its events arrive over server-sent events (resuming with Last-Event-ID
// after a dropped connection) and feed the charts (loss and validation loss, learning rate,
// grad norm, tokens/s by step), the rank heatmap of adaptive methods, the safety report and
// the event log. The job itself is re-read whenever its status changes.
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { api, authHeaders, errorMessage, failedAnswer, unwrap, type EventView, type JobView } from "../api/client";
import { LineChart } from "../components/LineChart";
import { RankHeatmap } from "../components/RankHeatmap";
import { SafetyReport } from "../components/Safety";
import { KeyValues, PageHead, QueryView, Stats, StatusBadge } from "../components/ui";
import { useCan } from "../identity";
import { fmtDuration, fmtInt, fmtNumber, fmtTime, shortUri } from "../lib/format";
import { isFinal, JobSeries } from "../lib/jobEvents";
import { ADAPTIVE_METHODS } from "../lib/methods";
import { invalidate, useQuery } from "../lib/query";
import { href, seg } from "../lib/router";
import { followEvents, type StreamState } from "../lib/sse";
import type { PageProps } from "../main";

export default function JobDetail({ params }: PageProps) {
  const id = params.id;
  const job = useQuery(`job/${id}`, () => unwrap(api.GET("/v1/jobs/{id}", { params: { path: { id } } })));
  return <QueryView result={job} label="Loading the job">{(data) => <JobPage job={data} />}</QueryView>;
}

function useJobStream(job: JobView) {
  const series = useRef(new JobSeries());
  const [version, setVersion] = useState(0);
  const [stream, setStream] = useState<StreamState>({ state: "connecting" });

  useEffect(() => {
    const controller = new AbortController();
    let frame = 0;
    let lastStatus: string | null = null;
    // Many events arrive at once on (re)connection: redraw once per frame, not per event.
    const schedule = () => {
      if (!frame) frame = requestAnimationFrame(() => {
        frame = 0;
        setVersion((v) => v + 1);
      });
    };
    void followEvents({
      url: `/v1/jobs/${encodeURIComponent(job.id)}/events/stream`,
      headers: () => authHeaders(),
      signal: controller.signal,
      resumeAfterEnd: () => !isFinal(series.current.status),
      onMessage: (m) => {
        let event: EventView;
        try {
          event = JSON.parse(m.data) as EventView;
        } catch {
          return;
        }
        series.current.add(event);
        if (event.kind === "status" && event.status !== lastStatus) {
          lastStatus = event.status;
          void invalidate(`job/${job.id}`);
          void invalidate("jobs");
        }
        schedule();
      },
      onState: (s) => {
        setStream(s);
        if (s.state === "failed") failedAnswer(s.status, s.contentType, s.body);
      },
    });
    return () => {
      controller.abort();
      if (frame) cancelAnimationFrame(frame);
    };
  }, [job.id]);

  return { series: series.current, version, stream };
}

function JobPage({ job }: { job: JobView }) {
  const { series, version, stream } = useJobStream(job);
  const canSubmit = useCan("submit");
  const [cancelError, setCancelError] = useState<string | null>(null);
  const [cancelling, setCancelling] = useState(false);
  const method = job.spec.method.type;
  const adaptive = ADAPTIVE_METHODS.has(method);
  const published = job.adapter_version;
  const versionQuery = useQuery(
    published && isFinal(job.status) ? `version/${published.name}/${published.version}` : null,
    () => unwrap(api.GET("/v1/adapters/{name}/versions/{version}", { params: { path: { name: published!.name, version: published!.version } } })),
  );

  const lossData = useMemo(() => series.lossData(), [version]);
  const lrData = useMemo(() => [series.steps.slice(), series.lr.slice()] as [number[], number[]], [version]);
  const gradData = useMemo(() => [series.steps.slice(), series.gradNorm.slice()] as [number[], (number | null)[]], [version]);
  const tpsData = useMemo(() => [series.steps.slice(), series.tokensPerSecond.slice()] as [number[], number[]], [version]);
  const rankTotals = useMemo(() => series.rankTotals(), [version]);
  const modules = useMemo(() => series.rankModules(), [version]);

  const step = series.steps.at(-1) ?? 0;
  const total = series.totalSteps ?? job.spec.training.max_steps;
  const status = job.status;

  const cancel = async () => {
    setCancelling(true);
    setCancelError(null);
    try {
      await unwrap(api.POST("/v1/jobs/{id}/cancel", { params: { path: { id: job.id } } }));
      await invalidate(`job/${job.id}`);
    } catch (e) {
      setCancelError(errorMessage(e));
    } finally {
      setCancelling(false);
    }
  };

  return (
    <>
      <PageHead
        title={
          <>
            {job.adapter_name} <span data-testid="job-status"><StatusBadge status={status} /></span>
          </>
        }
        docTitle={`Job ${job.adapter_name}`}
        crumbs={[{ label: "Jobs", href: href("/jobs") }, { label: job.id.slice(0, 8) }]}
        sub={
          <>
            <span class="mono">{job.id}</span> · {method} on {shortUri(job.spec.base_model)} · attempt {job.attempt} of {job.max_attempts}
          </>
        }
        actions={
          <>
            <StreamIndicator stream={stream} />
            {published && (
              <a class="button" href={href(`/adapters/${seg(published.name)}/versions/${published.version}`)} data-testid="version-link">
                Version {published.version}
              </a>
            )}
            {canSubmit && !isFinal(status) && status !== "cancel_requested" && (
              <button type="button" class="danger" onClick={cancel} disabled={cancelling}>
                {cancelling ? "Cancelling…" : "Cancel job"}
              </button>
            )}
          </>
        }
      />
      {cancelError && (
        <div class="alert error" role="alert">
          Cancel failed: {cancelError}
        </div>
      )}
      {job.error && (
        <section class="panel" aria-labelledby="error-title" data-testid="job-error">
          <h2 id="error-title">
            Failed: <code>{job.error.kind}</code>
          </h2>
          <pre>{job.error.message}</pre>
        </section>
      )}

      <section class="panel" aria-labelledby="progress-title">
        <h2 id="progress-title">Progress</h2>
        <div class="progress" role="progressbar" aria-valuemin={0} aria-valuemax={total} aria-valuenow={step} aria-label="Training steps">
          <span style={{ width: `${total ? (100 * step) / total : 0}%` }} />
        </div>
        <div style={{ marginTop: "0.75rem" }}>
          <Stats
            items={[
              ["Step", `${step} / ${total}`],
              ["Loss", fmtNumber(series.loss.at(-1))],
              ["Validation loss", fmtNumber([...series.evals.values()].at(-1))],
              ["Tokens/s", fmtInt(series.tokensPerSecond.at(-1))],
              ["ETA", isFinal(status) ? "–" : fmtDuration(series.etaSeconds)],
              ["Created", fmtTime(job.created_at)],
            ]}
          />
        </div>
      </section>

      <section aria-labelledby="charts-title">
        <h2 id="charts-title" class="visually-hidden">
          Training curves
        </h2>
        <div class="grid grid-2">
          <div class="panel">
            <LineChart
              id="loss"
              title="Loss"
              yLabel="loss"
              data={lossData}
              series={[
                { label: "train", color: "#364fc7" },
                { label: "validation", color: "#e8590c", points: true, dash: [6, 4] },
              ]}
            />
          </div>
          <div class="panel">
            <LineChart id="lr" title="Learning rate" data={lrData} series={[{ label: "lr", color: "#2b8a3e" }]} />
          </div>
          <div class="panel">
            <LineChart id="grad-norm" title="Gradient norm (before clipping)" data={gradData} series={[{ label: "grad norm", color: "#c2255c" }]} />
          </div>
          <div class="panel">
            <LineChart id="tokens" title="Tokens per second" data={tpsData} series={[{ label: "tokens/s", color: "#5f3dc4" }]} />
          </div>
        </div>
      </section>

      {adaptive && (
        <section class="panel" aria-labelledby="ranks-title">
          <h2 id="ranks-title">Rank allocation</h2>
          {series.ranks.length === 0 ? (
            <p class="muted">{method} reports its rank allocation as it changes; none yet.</p>
          ) : (
            <div class="grid grid-2">
              <RankHeatmap ranks={series.ranks} modules={modules} lastStep={Math.max(step, series.ranks.at(-1)!.step)} />
              <LineChart
                id="rank-budget"
                title="Total rank and budget"
                data={rankTotals}
                series={[
                  { label: "total rank", color: "#364fc7", stepped: true, points: true },
                  { label: "budget", color: "#868e96", dash: [5, 5], stepped: true },
                ]}
              />
            </div>
          )}
        </section>
      )}

      <section class="panel" aria-labelledby="safety-title">
        <h2 id="safety-title">Safety report</h2>
        {series.safety ? (
          <SafetyReport report={series.safety} verdict={versionQuery.data?.safety_verdict} />
        ) : job.spec.safety?.enabled === false ? (
          <p class="muted">The safety gate is off for this job.</p>
        ) : (
          <p class="muted">The gate evaluates the adapter after training{isFinal(status) ? "; it did not run for this job." : "."}</p>
        )}
      </section>

      <div class="grid grid-2">
        <section class="panel" aria-labelledby="spec-title">
          <h2 id="spec-title">Spec</h2>
          <KeyValues
            caption="Job spec"
            rows={[
              ["Base model", <span class="mono">{job.spec.base_model}</span>],
              ["Training data", <span class="mono">{job.spec.dataset.train}</span>],
              ["Method", <code>{JSON.stringify(job.spec.method)}</code>],
              ["Steps", job.spec.training.max_steps],
              ["Learning rate", job.spec.training.learning_rate],
              ["Batch × seq", `${job.spec.training.batch_size ?? "–"} × ${job.spec.training.seq_len ?? "–"}`],
              ["Started", fmtTime(job.started_at)],
              ["Finished", fmtTime(job.finished_at)],
            ]}
          />
          <details>
            <summary>Whole spec (JSON)</summary>
            <pre>{JSON.stringify(job.spec, null, 2)}</pre>
          </details>
        </section>
        <EventLog events={series.events} version={version} />
      </div>
    </>
  );
}

function StreamIndicator({ stream }: { stream: StreamState }) {
  const text =
    stream.state === "open"
      ? "Live"
      : stream.state === "connecting"
        ? "Connecting…"
        : stream.state === "reconnecting"
          ? `Connection lost; retrying in ${Math.round(stream.delayMs / 1000)}s`
          : stream.state === "ended"
            ? "All events received"
            : `Event stream failed (HTTP ${stream.status})`;
  return (
    <span class="muted small" role="status" data-testid="stream-state" data-state={stream.state}>
      {stream.state === "open" && <span class="spinner" aria-hidden="true" style={{ width: "0.7rem", height: "0.7rem" }} />} {text}
    </span>
  );
}

function describe(e: EventView): string {
  switch (e.kind) {
    case "status":
      return `${e.status}${e.message ? `: ${e.message}` : ""}`;
    case "progress":
      return `step ${e.step}/${e.total_steps} loss ${fmtNumber(e.loss)} lr ${fmtNumber(e.lr)}${e.grad_norm != null ? ` grad ${fmtNumber(e.grad_norm)}` : ""}`;
    case "eval":
      return `validation loss ${fmtNumber(e.loss)} at step ${e.step} (${fmtInt(e.tokens)} tokens)`;
    case "checkpoint":
      return `${e.resumed ? "resumed from" : "saved"} checkpoint at step ${e.step}`;
    case "ranks":
      return `total rank ${e.total}${e.budget != null ? ` (budget ${e.budget})` : ""} at step ${e.step}`;
    case "safety":
      return `refusal rate ${fmtNumber(e.report.refusal_rate_base)} → ${fmtNumber(e.report.refusal_rate_adapted)}`;
    case "evaluation":
      return `safety evaluation: ${fmtInt(e.done)}/${fmtInt(e.total)} prompts answered`;
    case "log":
      return e.message;
  }
}

const LOG_LIMIT = 500;

/** Progress-like events (a step, a batch of the safety evaluation) are shown on request. */
const isProgress = (e: EventView) => e.kind === "progress" || e.kind === "evaluation";

function EventLog({ events, version }: { events: EventView[]; version: number }) {
  const [progress, setProgress] = useState(false);
  const box = useRef<HTMLDivElement>(null);
  const shown = useMemo(() => {
    const list = progress ? events : events.filter((e) => !isProgress(e));
    return list.slice(-LOG_LIMIT);
  }, [version, progress, events.length]);
  const hidden = (progress ? events.length : events.filter((e) => !isProgress(e)).length) - shown.length;

  // Follow the newest events while the reader is at the bottom.
  useEffect(() => {
    const el = box.current;
    if (el && el.scrollHeight - el.scrollTop - el.clientHeight < 60) el.scrollTop = el.scrollHeight;
  }, [shown.length]);

  return (
    <section class="panel" aria-labelledby="log-title">
      <div class="row">
        <h2 id="log-title" style={{ margin: 0 }}>
          Events
        </h2>
        <span class="spacer" />
        <label class="check">
          <input type="checkbox" checked={progress} onChange={(e) => setProgress(e.currentTarget.checked)} /> show every step
        </label>
      </div>
      {hidden > 0 && <p class="muted small">The {hidden} oldest are not shown.</p>}
      {shown.length === 0 ? (
        <p class="muted">No events yet.</p>
      ) : (
        <div class="events" ref={box} tabIndex={0} role="region" aria-label="Event log" data-testid="event-log">
          <table>
            <thead>
              <tr>
                <th scope="col">#</th>
                <th scope="col">Time</th>
                <th scope="col">Kind</th>
                <th scope="col">What happened</th>
              </tr>
            </thead>
            <tbody>
              {shown.map((e) => (
                <tr key={e.seq} data-kind={e.kind}>
                  <td class="num muted">{e.seq}</td>
                  <td class="nowrap muted">{new Date(e.created_at).toLocaleTimeString("en-GB")}</td>
                  <td>{e.kind}</td>
                  <td>{describe(e)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
