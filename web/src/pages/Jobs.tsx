// The jobs table: newest first, refreshed every two seconds, filtered by status and adapter
// (kept in the URL), paged by cursor, with cancel on unfinished rows.
import { useEffect, useState } from "preact/hooks";
import { api, unwrap, errorMessage, type JobSummary } from "../api/client";
import { Empty, ErrorState, Field, Loading, PageHead, StatusBadge } from "../components/ui";
import { useCan } from "../identity";
import { fmtAge, fmtNumber, shortUri } from "../lib/format";
import { invalidate, useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";

export const JOB_STATUSES = [
  "queued",
  "scheduled",
  "running",
  "evaluating",
  "publishing",
  "succeeded",
  "failed",
  "cancel_requested",
  "cancelled",
] as const;
const ACTIVE = "queued,scheduled,running,evaluating,publishing,cancel_requested";
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const PAGE_SIZE = 25;

export default function Jobs({ location }: PageProps) {
  const status = location.query.get("status") ?? "";
  const adapter = location.query.get("adapter") ?? "";
  const cursor = location.query.get("cursor") ?? "";
  const [adapterInput, setAdapterInput] = useState(adapter);
  const canSubmit = useCan("submit");

  const setFilter = (next: Record<string, string>) =>
    navigate(href("/jobs", { status, adapter, ...next, cursor: next.cursor ?? "" }), { replace: true });

  // Typing filters after a pause, without a request per keystroke.
  useEffect(() => {
    if (adapterInput === adapter) return;
    const t = setTimeout(() => setFilter({ adapter: adapterInput.trim() }), 350);
    return () => clearTimeout(t);
  }, [adapterInput]);

  const key = `jobs?${status}|${adapter}|${cursor}`;
  const jobs = useQuery(
    key,
    () =>
      unwrap(
        api.GET("/v1/jobs", {
          params: { query: { status: status || undefined, adapter: adapter || undefined, cursor: cursor || undefined, limit: PAGE_SIZE } },
        }),
      ),
    { refreshMs: 2000 },
  );

  const filtered = Boolean(status || adapter);
  return (
    <>
      <PageHead
        title="Jobs"
        docTitle="Jobs"
        sub="Training jobs of this project, newest first. The table updates live."
        actions={
          canSubmit && (
            <a class="button primary" href={href("/jobs/new")}>
              New job
            </a>
          )
        }
      />
      <form class="filters" role="search" aria-label="Filter jobs" onSubmit={(e) => e.preventDefault()}>
        <Field path="filter-status" label="Status">
          {(attrs) => (
            <select {...attrs} value={status} onChange={(e) => setFilter({ status: e.currentTarget.value })}>
              <option value="">Any status</option>
              <option value={ACTIVE}>Active (not finished)</option>
              {JOB_STATUSES.map((s) => (
                <option key={s} value={s}>
                  {s.replace(/_/g, " ")}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field path="filter-adapter" label="Adapter">
          {(attrs) => (
            <input {...attrs} type="search" placeholder="adapter name" value={adapterInput} onInput={(e) => setAdapterInput(e.currentTarget.value)} />
          )}
        </Field>
        {filtered && (
          <button
            type="button"
            onClick={() => {
              setAdapterInput("");
              navigate(href("/jobs"), { replace: true });
            }}
          >
            Clear filters
          </button>
        )}
        <span class="spacer" />
        <span class="muted small" aria-live="polite">
          {jobs.loading && jobs.data ? "Refreshing…" : ""}
        </span>
      </form>
      {jobs.data === undefined ? (
        jobs.error ? (
          <ErrorState error={jobs.error} retry={() => void jobs.refresh()} />
        ) : (
          <Loading label="Loading jobs" />
        )
      ) : jobs.data.jobs.length === 0 ? (
        filtered || cursor ? (
          <Empty title="No jobs match these filters">
            <p>
              <a href={href("/jobs")}>Show all jobs</a>
            </p>
          </Empty>
        ) : (
          <Empty title="No jobs yet">
            <p>Jobs you submit appear here with their live progress.</p>
            {canSubmit && (
              <a class="button primary" href={href("/jobs/new")}>
                Submit the first job
              </a>
            )}
          </Empty>
        )
      ) : (
        <>
          {jobs.error !== undefined && (
            <div class="alert error" role="alert">
              Refreshing failed: {errorMessage(jobs.error)}. Showing the last answer.
            </div>
          )}
          <JobsTable jobs={jobs.data.jobs} canCancel={canSubmit} />
          <nav class="row" aria-label="Pages" style={{ marginTop: "0.75rem" }}>
            {cursor && (
              <a class="button" href={href("/jobs", { status, adapter })}>
                ← Newest
              </a>
            )}
            {jobs.data.next_cursor && (
              <a class="button" href={href("/jobs", { status, adapter, cursor: jobs.data.next_cursor })}>
                Older →
              </a>
            )}
          </nav>
        </>
      )}
    </>
  );
}

function JobsTable({ jobs, canCancel }: { jobs: JobSummary[]; canCancel: boolean }) {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), 5000);
    return () => clearInterval(t);
  }, []);
  return (
    <div class="table-wrap panel" style={{ padding: 0 }}>
      <table data-testid="jobs-table">
        <caption class="visually-hidden">Jobs, newest first</caption>
        <thead>
          <tr>
            <th scope="col">Status</th>
            <th scope="col">Adapter</th>
            <th scope="col">Method</th>
            <th scope="col">Base model</th>
            <th scope="col" class="num">
              Step
            </th>
            <th scope="col" class="num">
              Loss
            </th>
            <th scope="col">Age</th>
            <th scope="col">
              <span class="visually-hidden">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {jobs.map((job) => (
            <JobRow key={job.id} job={job} now={now} canCancel={canCancel} />
          ))}
        </tbody>
      </table>
    </div>
  );
}

function JobRow({ job, now, canCancel }: { job: JobSummary; now: number; canCancel: boolean }) {
  const [cancelling, setCancelling] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const progress = job.progress;
  const cancel = async () => {
    setCancelling(true);
    setError(null);
    try {
      await unwrap(api.POST("/v1/jobs/{id}/cancel", { params: { path: { id: job.id } } }));
      await invalidate("jobs");
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setCancelling(false);
    }
  };
  return (
    <tr data-job-id={job.id} data-status={job.status}>
      <td>
        <StatusBadge status={job.status} />
      </td>
      <td>
        <a href={href(`/jobs/${seg(job.id)}`)}>{job.adapter_name}</a>
        <div class="muted small mono">{job.id.slice(0, 8)}</div>
      </td>
      <td>{job.spec.method.type}</td>
      <td>
        <span class="truncate" title={job.spec.base_model}>
          {shortUri(job.spec.base_model)}
        </span>
      </td>
      <td class="num nowrap">{progress ? `${progress.step} / ${progress.total_steps}` : `– / ${job.spec.training.max_steps}`}</td>
      <td class="num">{progress ? fmtNumber(progress.loss) : "–"}</td>
      <td class="nowrap" title={job.created_at}>
        {fmtAge(job.created_at, now)}
      </td>
      <td class="nowrap">
        {canCancel && !FINAL.has(job.status) && job.status !== "cancel_requested" && (
          <button type="button" class="small danger" disabled={cancelling} onClick={cancel} aria-label={`Cancel job ${job.adapter_name} ${job.id.slice(0, 8)}`}>
            {cancelling ? "Cancelling…" : "Cancel"}
          </button>
        )}
        {error && (
          <div class="field-error" role="alert">
            {error}
          </div>
        )}
      </td>
    </tr>
  );
}
