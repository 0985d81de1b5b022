// The lineage of a version as a graph laid out by dagre: its ancestors (base model,
// datasets, jobs, parent versions) and its descendants (versions trained from it, bases
// merged from it). Every node is a link: versions to their page, jobs to theirs, base
// models to the adapters trained on them, datasets to their details here.
import dagre from "@dagrejs/dagre";
import { useMemo } from "preact/hooks";
import { api, unwrap, type Schemas } from "../api/client";
import { Empty, ErrorState, Field, KeyValues, Loading, PageHead } from "../components/ui";
import { shortSha, shortUri } from "../lib/format";
import { useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";

type Node = Schemas["Node"];
type Edge = Schemas["Edge"];
type Direction = "both" | "ancestors" | "descendants";

interface Placed {
  node: Node;
  x: number;
  y: number;
  width: number;
  height: number;
}

const STYLE: Record<Node["type"], { fill: string; stroke: string; kind: string }> = {
  adapter_version: { fill: "#dbe4ff", stroke: "#4c6ef5", kind: "adapter version" },
  job: { fill: "#f1f3f5", stroke: "#868e96", kind: "job" },
  dataset: { fill: "#fff3bf", stroke: "#f08c00", kind: "dataset" },
  base_model: { fill: "#d3f9d8", stroke: "#37b24d", kind: "base model" },
};

function label(n: Node): string {
  switch (n.type) {
    case "adapter_version":
      return `${n.adapter_name} v${n.version}`;
    case "job":
      return `job ${n.job_id.slice(0, 8)}`;
    case "dataset":
    case "base_model":
      return n.name ?? shortUri(n.uri);
  }
}

export default function Lineage({ params, location }: PageProps) {
  const name = params.name;
  const version = Number(params.version);
  const direction = (location.query.get("direction") as Direction) || "both";
  const depth = Math.min(32, Math.max(1, Number(location.query.get("depth")) || 3));
  const focus = location.query.get("focus");
  const path = { name, version };

  const ancestors = useQuery(direction !== "descendants" ? `lineage/${name}/${version}/up/${depth}` : null, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions/{version}/lineage", { params: { path, query: { depth } } })),
  );
  const descendants = useQuery(direction !== "ancestors" ? `lineage/${name}/${version}/down/${depth}` : null, () =>
    unwrap(api.GET("/v1/adapters/{name}/versions/{version}/descendants", { params: { path, query: { depth } } })),
  );

  const graph = useMemo(() => {
    const nodes = new Map<string, Node>();
    const edges = new Map<string, Edge>();
    for (const g of [ancestors.data?.graph, descendants.data]) {
      for (const n of g?.nodes ?? []) nodes.set(n.id, n);
      for (const e of g?.edges ?? []) edges.set(`${e.from}→${e.to}`, e);
    }
    return { nodes: [...nodes.values()], edges: [...edges.values()] };
  }, [ancestors.data, descendants.data]);

  const set = (patch: Record<string, string | number>) =>
    navigate(href(`/adapters/${seg(name)}/versions/${version}/lineage`, { direction, depth, ...patch }), { replace: true });

  const error = ancestors.error ?? descendants.error;
  const loading = (direction !== "descendants" && !ancestors.data) || (direction !== "ancestors" && !descendants.data);
  const self = `adapter_version:${name}@${version}`;
  const focused = graph.nodes.find((n) => n.id === focus);

  return (
    <>
      <PageHead
        title={`Lineage of ${name} v${version}`}
        docTitle={`Lineage ${name} v${version}`}
        crumbs={[
          { label: "Adapters", href: href("/adapters") },
          { label: name, href: href(`/adapters/${seg(name)}`) },
          { label: `v${version}`, href: href(`/adapters/${seg(name)}/versions/${version}`) },
          { label: "Lineage" },
        ]}
        sub="What went into this version, and what came out of it. Select a node to open it."
      />
      <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Lineage options">
        <div class="field">
          <span id="direction-label" style={{ fontWeight: 600, fontSize: "0.9rem", display: "block", marginBottom: "0.2rem" }}>
            Direction
          </span>
          <div class="segmented" role="group" aria-labelledby="direction-label">
            {(["both", "ancestors", "descendants"] as Direction[]).map((d) => (
              <button key={d} type="button" aria-pressed={direction === d} onClick={() => set({ direction: d })}>
                {d}
              </button>
            ))}
          </div>
        </div>
        <Field path="depth" label="Depth (hops)">
          {(a) => (
            <select {...a} value={depth} onChange={(e) => set({ depth: e.currentTarget.value })}>
              {[1, 2, 3, 4, 6, 8, 12, 16].map((d) => (
                <option key={d} value={d}>
                  {d}
                </option>
              ))}
            </select>
          )}
        </Field>
      </form>
      {error ? (
        <ErrorState error={error} />
      ) : loading ? (
        <Loading label="Loading the lineage" />
      ) : graph.nodes.length === 0 ? (
        <Empty title="No lineage recorded" />
      ) : (
        <>
          <LineageGraph nodes={graph.nodes} edges={graph.edges} self={self} name={name} version={version} />
          <div class="lineage-legend" aria-hidden="true">
            {Object.values(STYLE).map((s) => (
              <span key={s.kind}>
                <span class="swatch" style={{ background: s.fill, borderColor: s.stroke }} />
                {s.kind}
              </span>
            ))}
          </div>
          {focused && <NodeDetails node={focused} />}
          <details style={{ marginTop: "1rem" }}>
            <summary>The graph as a list</summary>
            <ul>
              {graph.edges.map((e) => {
                const from = graph.nodes.find((n) => n.id === e.from);
                const to = graph.nodes.find((n) => n.id === e.to);
                return (
                  <li key={`${e.from}→${e.to}`}>
                    {from ? label(from) : e.from} — {e.relation} → {to ? label(to) : e.to}
                  </li>
                );
              })}
            </ul>
          </details>
        </>
      )}
    </>
  );
}

/** The small line above a node's name: what it is (and a version's status). */
function kindText(n: Node): string {
  return STYLE[n.type].kind + (n.type === "adapter_version" ? ` · ${n.status}` : "");
}

function nodeHref(n: Node, name: string, version: number): string {
  switch (n.type) {
    case "adapter_version":
      return href(`/adapters/${seg(n.adapter_name)}/versions/${n.version}`);
    case "job":
      return href(`/jobs/${seg(n.job_id)}`);
    case "base_model":
      return href("/adapters", { base_model: n.name ?? n.uri });
    case "dataset":
      return href(`/adapters/${seg(name)}/versions/${version}/lineage`, { focus: n.id });
  }
}

function LineageGraph(props: { nodes: Node[]; edges: Edge[]; self: string; name: string; version: number }) {
  const layout = useMemo(() => {
    const g = new dagre.graphlib.Graph();
    g.setGraph({ rankdir: "LR", nodesep: 22, ranksep: 70, marginx: 16, marginy: 16 });
    g.setDefaultEdgeLabel(() => ({}));
    for (const n of props.nodes) {
      const kindLine = kindText(n).length * 7.2;
      const width = Math.min(280, Math.max(130, label(n).length * 7.4 + 24, kindLine + 24));
      g.setNode(n.id, { width, height: 46 });
    }
    for (const e of props.edges) if (g.hasNode(e.from) && g.hasNode(e.to)) g.setEdge(e.from, e.to);
    dagre.layout(g);
    const placed: Placed[] = props.nodes.map((n) => {
      const p = g.node(n.id);
      return { node: n, x: p.x, y: p.y, width: p.width, height: p.height };
    });
    const edges = g.edges().map((e) => ({ key: `${e.v}→${e.w}`, points: (g.edge(e).points ?? []) as Array<{ x: number; y: number }> }));
    const { width = 400, height = 200 } = g.graph();
    return { placed, edges, width, height };
  }, [props.nodes, props.edges]);

  return (
    <svg
      class="lineage-svg"
      width={layout.width}
      height={layout.height}
      viewBox={`0 0 ${layout.width} ${layout.height}`}
      style={{ maxHeight: "70vh" }}
      role="group"
      aria-label={`Lineage graph: ${props.nodes.length} nodes, ${props.edges.length} edges`}
      data-testid="lineage-graph"
    >
      <defs>
        <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
          <path d="M 0 0 L 10 5 L 0 10 z" fill="#868e96" />
        </marker>
      </defs>
      {layout.edges.map((e) => (
        <path
          key={e.key}
          d={e.points.map((p, i) => `${i ? "L" : "M"} ${p.x} ${p.y}`).join(" ")}
          fill="none"
          stroke="#adb5bd"
          stroke-width="1.5"
          marker-end="url(#arrow)"
        />
      ))}
      {layout.placed.map(({ node, x, y, width, height }) => {
        const s = STYLE[node.type];
        const isSelf = node.id === props.self;
        const text = label(node);
        return (
          <a
            key={node.id}
            href={nodeHref(node, props.name, props.version)}
            aria-current={isSelf ? "page" : undefined}
            data-node-id={node.id}
            data-node-type={node.type}
          >
            <rect x={x - width / 2} y={y - height / 2} width={width} height={height} rx="6" fill={s.fill} stroke={s.stroke} stroke-width={isSelf ? 3 : 1.25} />
            <text class="kind" x={x - width / 2 + 10} y={y - 6}>
              {kindText(node)}
            </text>
            <text x={x - width / 2 + 10} y={y + 12} font-weight={isSelf ? "700" : "400"}>
              {text.length > 34 ? `${text.slice(0, 33)}…` : text}
            </text>
          </a>
        );
      })}
    </svg>
  );
}

function NodeDetails({ node }: { node: Node }) {
  if (node.type !== "dataset" && node.type !== "base_model") return null;
  return (
    <section class="panel" aria-labelledby="node-title" style={{ marginTop: "1rem" }} data-testid="node-details">
      <h2 id="node-title">
        {STYLE[node.type].kind}: {node.name ?? shortUri(node.uri)}
      </h2>
      <KeyValues
        caption="Input details"
        rows={[
          ["URI", <span class="mono">{node.uri}</span>],
          ["Registered name", node.name ?? "–"],
          ["sha256", <span class="mono" title={node.sha256 ?? ""}>{shortSha(node.sha256)}</span>],
        ]}
      />
    </section>
  );
}
