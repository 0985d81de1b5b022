// The registry's adapters, filtered by base model, method, tag and version status (all in
// the URL), paged by cursor.
import { useEffect, useState } from "preact/hooks";
import { api, unwrap } from "../api/client";
import { METHOD_TYPES } from "../api/methods.gen";
import { Empty, ErrorState, Field, Loading, PageHead } from "../components/ui";
import { fmtAge } from "../lib/format";
import { useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";

const VERSION_STATUSES = ["ready", "pending", "quarantined", "failed", "deleted"] as const;
type VersionStatus = (typeof VERSION_STATUSES)[number];

export default function Adapters({ location }: PageProps) {
  const q = location.query;
  const filters = {
    base_model: q.get("base_model") ?? "",
    method: q.get("method") ?? "",
    tag: q.get("tag") ?? "",
    status: q.get("status") ?? "",
  };
  const cursor = q.get("cursor") ?? "";
  const [text, setText] = useState({ base_model: filters.base_model, tag: filters.tag });
  const set = (patch: Partial<typeof filters>) => navigate(href("/adapters", { ...filters, ...patch }), { replace: true });

  useEffect(() => {
    if (text.base_model === filters.base_model && text.tag === filters.tag) return;
    const t = setTimeout(() => set({ base_model: text.base_model.trim(), tag: text.tag.trim() }), 350);
    return () => clearTimeout(t);
  }, [text.base_model, text.tag]);

  const baseModels = useQuery("inputs/base-models", () => unwrap(api.GET("/v1/base-models")));
  const key = `adapters?${JSON.stringify(filters)}|${cursor}`;
  const adapters = useQuery(key, () =>
    unwrap(
      api.GET("/v1/adapters", {
        params: {
          query: {
            base_model: filters.base_model || undefined,
            method: filters.method || undefined,
            tag: filters.tag || undefined,
            status: (filters.status || undefined) as VersionStatus | undefined,
            cursor: cursor || undefined,
            limit: 50,
          },
        },
      }),
    ),
  );
  const filtered = Object.values(filters).some(Boolean);

  return (
    <>
      <PageHead title="Adapters" docTitle="Adapters" sub="Every adapter of this project with a version matching the filters." />
      <form class="filters" role="search" aria-label="Filter adapters" onSubmit={(e) => e.preventDefault()}>
        <Field path="filter-base" label="Base model">
          {(a) => (
            <input {...a} type="search" list="base-models" placeholder="name or URI" value={text.base_model} onInput={(e) => setText({ ...text, base_model: e.currentTarget.value })} />
          )}
        </Field>
        <datalist id="base-models">
          {baseModels.data?.flatMap((m) => [<option key={m.name} value={m.name} />, <option key={m.uri} value={m.uri} />])}
        </datalist>
        <Field path="filter-method" label="Method">
          {(a) => (
            <select {...a} value={filters.method} onChange={(e) => set({ method: e.currentTarget.value })}>
              <option value="">Any method</option>
              {METHOD_TYPES.map((m) => (
                <option key={m} value={m}>
                  {m}
                </option>
              ))}
            </select>
          )}
        </Field>
        <Field path="filter-tag" label="Tag">
          {(a) => <input {...a} type="search" value={text.tag} onInput={(e) => setText({ ...text, tag: e.currentTarget.value })} />}
        </Field>
        <Field path="filter-vstatus" label="Version status">
          {(a) => (
            <select {...a} value={filters.status} onChange={(e) => set({ status: e.currentTarget.value })}>
              <option value="">Any status</option>
              {VERSION_STATUSES.map((s) => (
                <option key={s} value={s}>
                  {s}
                </option>
              ))}
            </select>
          )}
        </Field>
        {filtered && (
          <button
            type="button"
            onClick={() => {
              setText({ base_model: "", tag: "" });
              navigate(href("/adapters"), { replace: true });
            }}
          >
            Clear filters
          </button>
        )}
      </form>
      {adapters.data === undefined ? (
        adapters.error ? (
          <ErrorState error={adapters.error} retry={() => void adapters.refresh()} />
        ) : (
          <Loading label="Loading adapters" />
        )
      ) : adapters.data.adapters.length === 0 ? (
        filtered ? (
          <Empty title="No adapter has a version matching these filters">
            <a href={href("/adapters")}>Show every adapter</a>
          </Empty>
        ) : (
          <Empty title="No adapters yet">
            <p>
              A job publishes a version of its adapter when it succeeds. <a href={href("/jobs/new")}>Submit a job</a>.
            </p>
          </Empty>
        )
      ) : (
        <>
          <div class="table-wrap panel" style={{ padding: 0 }}>
            <table data-testid="adapters-table">
              <caption class="visually-hidden">Adapters by name</caption>
              <thead>
                <tr>
                  <th scope="col">Adapter</th>
                  <th scope="col" class="num">
                    Versions
                  </th>
                  <th scope="col">Latest ready</th>
                  <th scope="col">Created</th>
                </tr>
              </thead>
              <tbody>
                {adapters.data.adapters.map((a) => (
                  <tr key={a.name}>
                    <td>
                      <a href={href(`/adapters/${seg(a.name)}`)}>{a.name}</a>
                    </td>
                    <td class="num">{a.versions}</td>
                    <td>
                      {a.latest_ready != null ? (
                        <a href={href(`/adapters/${seg(a.name)}/versions/${a.latest_ready}`)}>v{a.latest_ready}</a>
                      ) : (
                        <span class="muted">none</span>
                      )}
                      {a.quarantined > 0 && (
                        <>
                          {" "}
                          <a
                            href={href(`/adapters/${seg(a.name)}`)}
                            title="Versions the safety gate quarantined: never resolved, files for admin review only"
                          >
                            <span class="badge bad" data-testid="quarantined-count">
                              {a.quarantined} quarantined
                            </span>
                          </a>
                        </>
                      )}
                    </td>
                    <td title={a.created_at}>{fmtAge(a.created_at)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <nav class="row" aria-label="Pages" style={{ marginTop: "0.75rem" }}>
            {cursor && (
              <a class="button" href={href("/adapters", filters)}>
                ← First page
              </a>
            )}
            {adapters.data.next_cursor && (
              <a class="button" href={href("/adapters", { ...filters, cursor: adapters.data.next_cursor })}>
                Next →
              </a>
            )}
          </nav>
        </>
      )}
    </>
  );
}
