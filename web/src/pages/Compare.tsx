// Two versions of an adapter side by side: metrics, hyperparameters, method settings and
// the rank pattern each exported (from its adapter_config.json), differences marked.
import type { ComponentChildren } from "preact";
import { api, authHeaders, failedAnswer, unwrap, type VersionView } from "../api/client";
import { Empty, ErrorState, Field, Loading, PageHead } from "../components/ui";
import { fmtNumber, fmtValue } from "../lib/format";
import { rankOf, type PeftConfig } from "../lib/peft";
import { compareModules, shortModule } from "../lib/jobEvents";
import { useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";


async function adapterConfig(v: VersionView): Promise<PeftConfig | null> {
  if (!v.files.some((f) => f.name === "adapter_config.json")) return null;
  const url = `/v1/adapters/${seg(v.adapter_name)}/versions/${v.version}/files/adapter_config.json`;
  const response = await fetch(url, { headers: authHeaders() });
  if (!response.ok) throw failedAnswer(response.status, response.headers.get("content-type"), await response.text());
  return (await response.json()) as PeftConfig;
}

function useVersion(name: string, version: number | null) {
  const v = useQuery(version === null ? null : `version/${name}/${version}`, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions/{version}", { params: { path: { name, version: version! } } })),
  );
  const config = useQuery(v.data ? `version-config/${name}/${version}` : null, () => adapterConfig(v.data!));
  return { v, config };
}

export default function Compare({ params, location }: PageProps) {
  const name = params.name;
  const num = (k: string) => {
    const n = Number(location.query.get(k));
    return Number.isInteger(n) && n > 0 ? n : null;
  };
  const a = num("a");
  const b = num("b");
  const versions = useQuery(`adapter/${name}/versions?`, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions", { params: { path: { name }, query: { limit: 50 } } })),
  );
  const left = useVersion(name, a);
  const right = useVersion(name, b);
  const choices = versions.data?.versions.map((v) => v.version) ?? [];

  const picker = (which: "a" | "b", value: number | null) => (
    <Field path={`compare-${which}`} label={which === "a" ? "Left version" : "Right version"}>
      {(attrs) => (
        <select {...attrs} value={value ?? ""} onChange={(e) => navigate(href(`/adapters/${seg(name)}/compare`, { a, b, [which]: e.currentTarget.value }), { replace: true })}>
          <option value="">choose</option>
          {[...new Set([...choices, ...(value ? [value] : [])])].map((v) => (
            <option key={v} value={v}>
              v{v}
            </option>
          ))}
        </select>
      )}
    </Field>
  );

  let body: ComponentChildren;
  if (a === null || b === null) body = <Empty title="Choose two versions to compare" />;
  else if (left.v.error || right.v.error) body = <ErrorState error={left.v.error ?? right.v.error} />;
  else if (!left.v.data || !right.v.data) body = <Loading label="Loading both versions" />;
  else body = <Comparison a={left.v.data} b={right.v.data} ca={left.config} cb={right.config} />;

  return (
    <>
      <PageHead
        title={`Compare ${name} versions`}
        docTitle={`Compare ${name}`}
        crumbs={[{ label: "Adapters", href: href("/adapters") }, { label: name, href: href(`/adapters/${seg(name)}`) }, { label: "Compare" }]}
        sub="Rows that differ are highlighted."
      />
      <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Versions to compare">
        {picker("a", a)}
        {picker("b", b)}
      </form>
      {body}
    </>
  );
}

type ConfigQuery = { data: PeftConfig | null | undefined; error: unknown; loading: boolean };

function Comparison({ a, b, ca, cb }: { a: VersionView; b: VersionView; ca: ConfigQuery; cb: ConfigQuery }) {
  const metricRows = (v: VersionView) => ({
    status: v.status,
    "initial loss": fmtNumber(v.metrics?.initial_loss),
    "final loss": fmtNumber(v.metrics?.final_loss),
    "validation loss": fmtNumber(v.metrics?.eval_loss),
    steps: fmtValue(v.metrics?.steps),
    "tokens/s": fmtNumber(v.metrics?.tokens_per_second),
    "trainable parameters": fmtValue(v.metrics?.trainable_parameters),
    "refusal rate (adapted)": fmtNumber(v.evaluation?.refusal_rate_adapted),
    "benign KL": fmtNumber(v.evaluation?.benign_kl_mean),
    "safety decision": v.safety_verdict?.decision ?? "–",
    "base model": v.base_model,
  });
  const flat = (o: object) => Object.fromEntries(Object.entries(o).map(([k, val]) => [k, fmtValue(val)]));
  return (
    <div data-testid="comparison">
      <CompareTable title="Metrics" a={a.version} b={b.version} left={metricRows(a)} right={metricRows(b)} />
      <CompareTable title="Hyperparameters" a={a.version} b={b.version} left={flat(a.hyperparameters)} right={flat(b.hyperparameters)} />
      <CompareTable title="Method" a={a.version} b={b.version} left={flat(a.method)} right={flat(b.method)} />
      <RankPatterns a={a.version} b={b.version} ca={ca} cb={cb} />
    </div>
  );
}

function CompareTable(props: { title: string; a: number; b: number; left: Record<string, string>; right: Record<string, string> }) {
  const keys = [...new Set([...Object.keys(props.left), ...Object.keys(props.right)])];
  const id = `cmp-${props.title.toLowerCase().replace(/\W+/g, "-")}`;
  return (
    <section class="panel" aria-labelledby={id}>
      <h2 id={id}>{props.title}</h2>
      <div class="table-wrap">
        <table>
          <thead>
            <tr>
              <th scope="col">Field</th>
              <th scope="col">v{props.a}</th>
              <th scope="col">v{props.b}</th>
            </tr>
          </thead>
          <tbody>
            {keys.map((k) => {
              const l = props.left[k] ?? "–";
              const r = props.right[k] ?? "–";
              const differs = l !== r;
              return (
                <tr key={k} class={differs ? "differs" : undefined} data-differs={differs ? "true" : undefined}>
                  <th scope="row">
                    {k}
                    {differs && <span class="visually-hidden"> (differs)</span>}
                  </th>
                  <td class="mono small">{l}</td>
                  <td class="mono small">{r}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
      </div>
    </section>
  );
}


function RankPatterns({ a, b, ca, cb }: { a: number; b: number; ca: ConfigQuery; cb: ConfigQuery }) {
  if (ca.error || cb.error) return <ErrorState error={ca.error ?? cb.error} />;
  if (ca.data === undefined || cb.data === undefined) return <Loading label="Reading both adapter configs" />;
  const modules = [...new Set([...Object.keys(ca.data?.rank_pattern ?? {}), ...Object.keys(cb.data?.rank_pattern ?? {})])].sort(compareModules);
  return (
    <section class="panel" aria-labelledby="cmp-ranks" data-testid="rank-patterns">
      <h2 id="cmp-ranks">Rank pattern</h2>
      <p class="muted small">
        Modules with a rank of their own in either version (<code>rank_pattern</code> in adapter_config.json); the
        others of a version's target modules have its default rank: v{a} r={ca.data?.r ?? "–"}, v{b} r=
        {cb.data?.r ?? "–"}. A dash: the version does not adapt that module.
      </p>
      {modules.length === 0 ? (
        <p class="muted">Neither version has per-module ranks: every module has the default rank.</p>
      ) : (
        <div class="table-wrap">
          <table>
            <thead>
              <tr>
                <th scope="col">Module</th>
                <th scope="col" class="num">
                  v{a}
                </th>
                <th scope="col" class="num">
                  v{b}
                </th>
              </tr>
            </thead>
            <tbody>
              {modules.map((m) => {
                const l = rankOf(ca.data, m);
                const r = rankOf(cb.data, m);
                return (
                  <tr key={m} class={l !== r ? "differs" : undefined}>
                    <th scope="row" class="mono small" title={m}>
                      {shortModule(m)}
                    </th>
                    <td class="num">{l ?? "–"}</td>
                    <td class="num">{r ?? "–"}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      )}
    </section>
  );
}
