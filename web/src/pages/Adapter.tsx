// One adapter: its versions (newest first) with their aliases and tags, alias editing for
// admins (create, move atomically, delete), and the choice of two versions to compare.
import { useState } from "preact/hooks";
import { api, unwrap, errorMessage, type Schemas } from "../api/client";
import { Empty, Field, PageHead, QueryView, StatusBadge } from "../components/ui";
import { useCan } from "../identity";
import { fmtAge, fmtNumber } from "../lib/format";
import { invalidate, useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";

export default function Adapter({ params, location }: PageProps) {
  const name = params.name;
  const before = location.query.get("before");
  const page = useQuery(`adapter/${name}/versions?${before ?? ""}`, () =>
    unwrap(
      api.GET("/v1/adapters/{name}/versions", {
        params: { path: { name }, query: { before: before ? Number(before) : undefined, limit: 50 } },
      }),
    ),
  );
  return (
    <>
      <PageHead
        title={name}
        docTitle={`Adapter ${name}`}
        crumbs={[{ label: "Adapters", href: href("/adapters") }, { label: name }]}
        sub="Versions, newest first, with their aliases and tags."
        actions={
          <a class="button" href={href("/jobs/new", { adapter: name })}>
            Train a new version
          </a>
        }
      />
      <QueryView result={page} label="Loading versions">
        {(data) => <AdapterBody name={name} data={data} before={before} />}
      </QueryView>
    </>
  );
}

function AdapterBody({ name, data, before }: { name: string; data: Schemas["VersionPage"]; before: string | null }) {
  const [selected, setSelected] = useState<number[]>([]);
  const aliasesOf = (v: number) => data.aliases.filter((a) => a.version === v).map((a) => a.alias);
  const toggle = (v: number, on: boolean) =>
    setSelected((s) => (on ? [...s.filter((x) => x !== v), v].slice(-2) : s.filter((x) => x !== v)));

  if (data.versions.length === 0) {
    return <Empty title="No versions on this page">{before && <a href={href(`/adapters/${seg(name)}`)}>Newest versions</a>}</Empty>;
  }
  const [a, b] = [...selected].sort((x, y) => x - y);
  return (
    <div class="grid" style={{ gridTemplateColumns: "minmax(0, 3fr) minmax(260px, 1fr)" }}>
      <section class="panel" aria-labelledby="versions-title" style={{ padding: 0 }}>
        <div class="row" style={{ padding: "0.75rem 1rem" }}>
          <h2 id="versions-title" style={{ margin: 0 }}>
            Versions
          </h2>
          <span class="spacer" />
          <span class="muted small" aria-live="polite">
            {selected.length}/2 selected
          </span>
          <button type="button" class="primary small" disabled={selected.length !== 2} onClick={() => navigate(href(`/adapters/${seg(name)}/compare`, { a, b }))}>
            Compare selected
          </button>
        </div>
        <div class="table-wrap">
          <table data-testid="versions-table">
            <caption class="visually-hidden">Versions of {name}</caption>
            <thead>
              <tr>
                <th scope="col">
                  <span class="visually-hidden">Select to compare</span>
                </th>
                <th scope="col">Version</th>
                <th scope="col">Status</th>
                <th scope="col">Method</th>
                <th scope="col">Aliases</th>
                <th scope="col">Tags</th>
                <th scope="col" class="num">
                  Final loss
                </th>
                <th scope="col">Created</th>
              </tr>
            </thead>
            <tbody>
              {data.versions.map((v) => (
                <tr key={v.version} data-version={v.version}>
                  <td>
                    <input
                      type="checkbox"
                      aria-label={`Compare version ${v.version}`}
                      checked={selected.includes(v.version)}
                      onChange={(e) => toggle(v.version, e.currentTarget.checked)}
                    />
                  </td>
                  <td>
                    <a href={href(`/adapters/${seg(name)}/versions/${v.version}`)}>v{v.version}</a>
                  </td>
                  <td>
                    <StatusBadge status={v.status} />
                  </td>
                  <td>{v.method.type}</td>
                  <td>
                    {aliasesOf(v.version).map((al) => (
                      <span class="chip alias" key={al}>
                        {al}
                      </span>
                    ))}
                  </td>
                  <td>
                    {v.tags.map((t) => (
                      <span class="chip" key={t}>
                        {t}
                      </span>
                    ))}
                  </td>
                  <td class="num">{fmtNumber(v.metrics?.final_loss)}</td>
                  <td title={v.created_at}>{fmtAge(v.created_at)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
        <nav class="row" aria-label="Pages" style={{ padding: "0.75rem 1rem" }}>
          {before && (
            <a class="button" href={href(`/adapters/${seg(name)}`)}>
              ← Newest
            </a>
          )}
          {data.next_before != null && (
            <a class="button" href={href(`/adapters/${seg(name)}`, { before: data.next_before })}>
              Older →
            </a>
          )}
        </nav>
      </section>
      <Aliases name={name} aliases={data.aliases} versions={data.versions.map((v) => v.version)} />
    </div>
  );
}

function Aliases({ name, aliases, versions }: { name: string; aliases: Schemas["AliasRow"][]; versions: number[] }) {
  const isAdmin = useCan("admin");
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const [newAlias, setNewAlias] = useState("");
  const [newVersion, setNewVersion] = useState(String(versions[0] ?? ""));

  const run = async (what: string, call: () => Promise<unknown>) => {
    setBusy(true);
    setError(null);
    setNotice(null);
    try {
      await call();
      setNotice(what);
      await invalidate(`adapter/${name}`);
      await invalidate(`version/${name}/`);
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(false);
    }
  };
  const move = (alias: string, version: number) =>
    run(`${alias} now points to v${version}`, () =>
      unwrap(api.PUT("/v1/adapters/{name}/aliases/{alias}", { params: { path: { name, alias } }, body: { version } })),
    );
  const remove = (alias: string) =>
    run(`${alias} removed`, () => unwrap(api.DELETE("/v1/adapters/{name}/aliases/{alias}", { params: { path: { name, alias } } })));

  return (
    <section class="panel" aria-labelledby="aliases-title" data-testid="aliases">
      <h2 id="aliases-title">Aliases</h2>
      <p class="muted small">Serving engines resolve an alias to a version; moving one is atomic.</p>
      {error && (
        <div class="alert error" role="alert">
          {error}
        </div>
      )}
      {notice && (
        <div class="alert success" role="status">
          {notice}
        </div>
      )}
      {aliases.length === 0 && <p class="muted">No aliases yet.</p>}
      <ul style={{ listStyle: "none", padding: 0, margin: 0 }}>
        {aliases.map((a) => (
          <li key={a.alias} style={{ marginBottom: "0.6rem" }} data-alias={a.alias}>
            <div class="row">
              <span class="chip alias">{a.alias}</span> →{" "}
              <a href={href(`/adapters/${seg(name)}/versions/${a.version}`)} data-testid={`alias-${a.alias}-target`}>
                v{a.version}
              </a>
            </div>
            {isAdmin && (
              <AliasMover alias={a.alias} current={a.version} versions={versions} busy={busy} onMove={(v) => move(a.alias, v)} onRemove={() => remove(a.alias)} />
            )}
          </li>
        ))}
      </ul>
      {isAdmin && (
        <form
          onSubmit={(e) => {
            e.preventDefault();
            if (newAlias.trim()) void move(newAlias.trim(), Number(newVersion));
          }}
        >
          <h3>New alias</h3>
          <div class="row" style={{ alignItems: "flex-end" }}>
            <Field path="new-alias" label="Alias">
              {(attrs) => <input {...attrs} value={newAlias} placeholder="prod" onInput={(e) => setNewAlias(e.currentTarget.value)} />}
            </Field>
            <Field path="new-alias-version" label="Version">
              {(attrs) => (
                <select {...attrs} value={newVersion} onChange={(e) => setNewVersion(e.currentTarget.value)}>
                  {versions.map((v) => (
                    <option key={v} value={v}>
                      v{v}
                    </option>
                  ))}
                </select>
              )}
            </Field>
            <button type="submit" disabled={busy || !newAlias.trim()} style={{ marginBottom: "0.85rem" }}>
              Set alias
            </button>
          </div>
        </form>
      )}
    </section>
  );
}

function AliasMover(props: { alias: string; current: number; versions: number[]; busy: boolean; onMove: (v: number) => void; onRemove: () => void }) {
  const [target, setTarget] = useState(String(props.current));
  const id = `move-${props.alias}`;
  return (
    <div class="row small" style={{ marginTop: "0.25rem" }}>
      <label for={id} class="visually-hidden">
        Move {props.alias} to version
      </label>
      <select id={id} value={target} onChange={(e) => setTarget(e.currentTarget.value)} style={{ width: "auto" }}>
        {props.versions.map((v) => (
          <option key={v} value={v}>
            v{v}
          </option>
        ))}
      </select>
      <button type="button" class="small" disabled={props.busy || Number(target) === props.current} onClick={() => props.onMove(Number(target))}>
        Move {props.alias}
      </button>
      <button type="button" class="small danger" disabled={props.busy} onClick={props.onRemove} aria-label={`Delete alias ${props.alias}`}>
        Delete
      </button>
    </div>
  );
}
