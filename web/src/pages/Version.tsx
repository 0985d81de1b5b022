// One adapter version: status, where it lives, its files (sizes, digests, downloads), its
// metrics, hyperparameters, method and safety evaluation; tags for admins; links to the
// job that made it, its parent and its lineage.
import { useState } from "preact/hooks";
import { api, authHeaders, errorMessage, failedAnswer, unwrap, type VersionView } from "../api/client";
import { SafetyReport } from "../components/Safety";
import { Field, KeyValues, PageHead, QueryView, StatusBadge } from "../components/ui";
import { useCan } from "../identity";
import { fmtBytes, fmtDuration, fmtInt, fmtNumber, fmtTime, fmtValue } from "../lib/format";
import { invalidate, useQuery } from "../lib/query";
import { href, seg } from "../lib/router";
import type { PageProps } from "../main";

export default function Version({ params }: PageProps) {
  const name = params.name;
  const version = Number(params.version);
  const v = useQuery(`version/${name}/${version}`, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions/{version}", { params: { path: { name, version } } })),
  );
  return (
    <>
      <PageHead
        title={
          <>
            {name} <span class="muted">v{version}</span> {v.data && <StatusBadge status={v.data.status} />}
          </>
        }
        docTitle={`${name} v${version}`}
        crumbs={[{ label: "Adapters", href: href("/adapters") }, { label: name, href: href(`/adapters/${seg(name)}`) }, { label: `v${version}` }]}
        actions={
          <>
            <a class="button" href={href(`/adapters/${seg(name)}/versions/${version}/lineage`)} data-testid="lineage-link">
              Lineage
            </a>
            {version > 1 && (
              <a class="button" href={href(`/adapters/${seg(name)}/compare`, { a: version - 1, b: version })}>
                Compare with v{version - 1}
              </a>
            )}
          </>
        }
      />
      <QueryView result={v} label="Loading the version">
        {(data) => <VersionBody v={data} />}
      </QueryView>
    </>
  );
}

function VersionBody({ v }: { v: VersionView }) {
  const name = v.adapter_name;
  const versions = useQuery(`adapter/${name}/versions?`, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions", { params: { path: { name }, query: { limit: 50 } } })),
  );
  const aliases = versions.data?.aliases.filter((a) => a.version === v.version) ?? [];
  const m = v.metrics;
  return (
    <>
      <div class="grid grid-2">
        <section class="panel" aria-labelledby="about-title">
          <h2 id="about-title">About</h2>
          <KeyValues
            caption="About this version"
            rows={[
              ["Location", <span class="mono" data-testid="version-uri">{v.uri}</span>],
              ["Base model", <span class="mono">{v.base_model}</span>],
              ["Made by job", <a href={href(`/jobs/${seg(v.job_id)}`)} class="mono">{v.job_id}</a>],
              ["Parent", v.parent ? <a href={href(`/adapters/${seg(v.parent.adapter_name)}/versions/${v.parent.version}`)}>{v.parent.adapter_name} v{v.parent.version}</a> : "none"],
              ["Aliases", aliases.length ? aliases.map((a) => <span class="chip alias" key={a.alias}>{a.alias}</span>) : <span class="muted">none</span>],
              ["Created", fmtTime(v.created_at)],
              ["Ready", fmtTime(v.ready_at)],
            ]}
          />
          <Tags v={v} />
        </section>
        <section class="panel" aria-labelledby="metrics-title">
          <h2 id="metrics-title">Metrics</h2>
          {m ? (
            <KeyValues
              caption="Training metrics"
              rows={[
                ["Loss", `${fmtNumber(m.initial_loss)} → ${fmtNumber(m.final_loss)}`],
                ["Validation loss", fmtNumber(m.eval_loss)],
                ["Steps", fmtInt(m.steps)],
                ["Tokens", fmtInt(m.tokens)],
                ["Training time", fmtDuration(m.train_seconds)],
                ["Tokens/s", fmtInt(m.tokens_per_second)],
                ["Trainable parameters", fmtInt(m.trainable_parameters)],
              ]}
            />
          ) : (
            <p class="muted">No metrics: the version was not published.</p>
          )}
        </section>
      </div>
      <Files v={v} />
      <div class="grid grid-2">
        <section class="panel" aria-labelledby="hp-title">
          <h2 id="hp-title">Hyperparameters</h2>
          <KeyValues caption="Training settings" rows={Object.entries(v.hyperparameters).map(([k, val]) => [k, fmtValue(val)])} />
        </section>
        <section class="panel" aria-labelledby="method-title">
          <h2 id="method-title">Method: {v.method.type}</h2>
          <KeyValues caption="Method settings" rows={Object.entries(v.method).filter(([k]) => k !== "type").map(([k, val]) => [k, fmtValue(val)])} />
        </section>
      </div>
      <section class="panel" aria-labelledby="eval-title">
        <h2 id="eval-title">Evaluation</h2>
        {v.evaluation ? <SafetyReport report={v.evaluation} verdict={v.safety_verdict} /> : <p class="muted">The safety gate did not run for this version.</p>}
      </section>
    </>
  );
}

function Tags({ v }: { v: VersionView }) {
  const isAdmin = useCan("admin");
  const [tag, setTag] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const path = { name: v.adapter_name, version: v.version };
  const change = async (t: string, add: boolean) => {
    setBusy(true);
    setError(null);
    try {
      const call = add
        ? api.PUT("/v1/adapters/{name}/versions/{version}/tags/{tag}", { params: { path: { ...path, tag: t } } })
        : api.DELETE("/v1/adapters/{name}/versions/{version}/tags/{tag}", { params: { path: { ...path, tag: t } } });
      await unwrap(call);
      if (add) setTag("");
      await invalidate(`version/${v.adapter_name}/${v.version}`);
      await invalidate(`adapter/${v.adapter_name}`);
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(false);
    }
  };
  return (
    <div data-testid="tags" style={{ marginTop: "0.75rem" }}>
      <h3>Tags</h3>
      {v.tags.length === 0 && <p class="muted">No tags.</p>}
      <div>
        {v.tags.map((t) => (
          <span class="chip" key={t}>
            {t}
            {isAdmin && (
              <button type="button" disabled={busy} onClick={() => void change(t, false)} aria-label={`Remove tag ${t}`}>
                ×
              </button>
            )}
          </span>
        ))}
      </div>
      {isAdmin && (
        <form
          class="row"
          style={{ alignItems: "flex-end", marginTop: "0.5rem" }}
          onSubmit={(e) => {
            e.preventDefault();
            if (tag.trim()) void change(tag.trim(), true);
          }}
        >
          <Field path="new-tag" label="Add a tag" errors={error ? [error] : undefined}>
            {(attrs) => <input {...attrs} value={tag} placeholder="candidate" onInput={(e) => setTag(e.currentTarget.value)} />}
          </Field>
          <button type="submit" disabled={busy || !tag.trim()} style={{ marginBottom: "0.85rem" }}>
            Add tag
          </button>
        </form>
      )}
    </div>
  );
}

function Files({ v }: { v: VersionView }) {
  const [downloading, setDownloading] = useState<string | null>(null);
  const [error, setError] = useState<string | null>(null);
  const quarantined = v.status === "quarantined";
  // A plain link cannot carry the API key: fetch the file, then hand it to the browser.
  const download = async (file: string) => {
    setDownloading(file);
    setError(null);
    try {
      // A quarantined version's files are for an admin's review, asked for explicitly.
      const review = quarantined ? "?quarantined=allow" : "";
      const url = `/v1/adapters/${seg(v.adapter_name)}/versions/${v.version}/files/${seg(file)}${review}`;
      const response = await fetch(url, { headers: authHeaders() });
      if (!response.ok) throw failedAnswer(response.status, response.headers.get("content-type"), await response.text());
      const blob = await response.blob();
      const objectUrl = URL.createObjectURL(blob);
      const a = document.createElement("a");
      a.href = objectUrl;
      a.download = file;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(objectUrl), 60_000);
    } catch (e) {
      setError(`${file}: ${errorMessage(e)}`);
    } finally {
      setDownloading(null);
    }
  };
  return (
    <section class="panel" aria-labelledby="files-title">
      <h2 id="files-title">Files</h2>
      {quarantined && (
        <p class="alert error" data-testid="quarantined-note">
          Quarantined by the safety gate: this version is never resolved or served. Its files are kept for review
          and download only with an admin key.
        </p>
      )}
      {error && (
        <div class="alert error" role="alert">
          Download failed: {error}
        </div>
      )}
      {v.files.length === 0 ? (
        <p class="muted">No files: the version was not published.</p>
      ) : (
        <div class="table-wrap">
          <table data-testid="files-table">
            <caption class="visually-hidden">Files of this version</caption>
            <thead>
              <tr>
                <th scope="col">File</th>
                <th scope="col" class="num">
                  Size
                </th>
                <th scope="col">sha256</th>
                <th scope="col">
                  <span class="visually-hidden">Download</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {v.files.map((f) => (
                <tr key={f.name} data-file={f.name}>
                  <td class="mono">{f.name}</td>
                  <td class="num nowrap" title={`${f.size} bytes`}>
                    {fmtBytes(f.size)}
                  </td>
                  <td class="mono small" style={{ wordBreak: "break-all" }} data-testid="sha256">
                    {f.sha256}
                  </td>
                  <td>
                    <button type="button" class="small" disabled={downloading !== null} onClick={() => void download(f.name)} aria-label={`Download ${f.name}`}>
                      {downloading === f.name ? "Downloading…" : "Download"}
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
