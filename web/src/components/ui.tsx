// Small building blocks every page uses: status badges, the loading, empty and error
// states, the page head with breadcrumbs, form fields with their errors, key figures.
import type { ComponentChildren, JSX } from "preact";
import { useEffect, useRef } from "preact/hooks";
import { errorMessage } from "../api/client";
import { fieldId } from "../lib/problem";

const TONE: Record<string, string> = {
  queued: "neutral",
  scheduled: "neutral",
  running: "active",
  evaluating: "active",
  publishing: "active",
  succeeded: "good",
  ready: "good",
  publish: "good",
  failed: "bad",
  quarantined: "bad",
  quarantine: "bad",
  cancel_requested: "warn",
  pending: "warn",
  warn: "warn",
  cancelled: "neutral",
  deleted: "neutral",
};

export function StatusBadge({ status }: { status: string }) {
  return <span class={`badge ${TONE[status] ?? "neutral"}`}>{status.replace(/_/g, " ")}</span>;
}

export function Loading({ label = "Loading" }: { label?: string }) {
  return (
    <div class="state" role="status" aria-live="polite">
      <span class="spinner" aria-hidden="true" /> {label}…
    </div>
  );
}

export function Empty({ title, children }: { title: string; children?: ComponentChildren }) {
  return (
    <div class="state">
      <h2>{title}</h2>
      {children}
    </div>
  );
}

export function ErrorState({ error, retry }: { error: unknown; retry?: () => void }) {
  return (
    <div class="state error" role="alert">
      <h2>Something went wrong</h2>
      <p>{errorMessage(error)}</p>
      {retry && (
        <button type="button" onClick={retry}>
          Try again
        </button>
      )}
    </div>
  );
}

/** Loading / error / content, for one query's answer. */
export function QueryView<T>(props: {
  result: { data: T | undefined; error: unknown; loading: boolean; refresh: () => Promise<void> };
  label?: string;
  children: (data: T) => ComponentChildren;
}) {
  const { data, error, refresh } = props.result;
  if (data !== undefined) return <>{props.children(data)}</>;
  if (error) return <ErrorState error={error} retry={() => void refresh()} />;
  return <Loading label={props.label} />;
}

export interface Crumb {
  label: string;
  href?: string;
}

/** The page's title (focused on arrival, for screen readers), its trail and actions. */
export function PageHead(props: { title: ComponentChildren; docTitle: string; crumbs?: Crumb[]; sub?: ComponentChildren; actions?: ComponentChildren }) {
  const h1 = useRef<HTMLHeadingElement>(null);
  useEffect(() => {
    document.title = `${props.docTitle} · loraforge`;
  }, [props.docTitle]);
  useEffect(() => {
    h1.current?.focus({ preventScroll: true });
  }, []);
  return (
    <>
      {props.crumbs && props.crumbs.length > 0 && (
        <nav class="breadcrumbs" aria-label="Breadcrumb">
          <ol>
            {props.crumbs.map((c, i) => (
              <li key={i}>{c.href ? <a href={c.href}>{c.label}</a> : <span aria-current="page">{c.label}</span>}</li>
            ))}
          </ol>
        </nav>
      )}
      <div class="page-head">
        <div>
          <h1 tabIndex={-1} ref={h1}>
            {props.title}
          </h1>
          {props.sub && <p class="sub">{props.sub}</p>}
        </div>
        {props.actions && <div class="row">{props.actions}</div>}
      </div>
    </>
  );
}

/** A labelled control with its help and its errors, wired for screen readers. */
export function Field(props: {
  path: string;
  label: ComponentChildren;
  help?: ComponentChildren;
  errors?: string[];
  children: (attrs: { id: string; "aria-invalid": "true" | undefined; "aria-describedby": string | undefined }) => JSX.Element;
}) {
  const id = fieldId(props.path);
  const described = [props.help ? `${id}-help` : "", props.errors?.length ? `${id}-error` : ""].filter(Boolean).join(" ");
  return (
    <div class="field" data-field={props.path}>
      <label for={id}>{props.label}</label>
      {props.children({ id, "aria-invalid": props.errors?.length ? "true" : undefined, "aria-describedby": described || undefined })}
      {props.help && (
        <div class="help" id={`${id}-help`}>
          {props.help}
        </div>
      )}
      {props.errors && props.errors.length > 0 && (
        <div class="field-error" id={`${id}-error`} data-error-for={props.path}>
          {props.errors.join("; ")}
        </div>
      )}
    </div>
  );
}

export function Stats({ items }: { items: Array<[string, ComponentChildren]> }) {
  return (
    <dl class="stats">
      {items.map(([k, v]) => (
        <div class="stat" key={k}>
          <dt>{k}</dt>
          <dd>{v}</dd>
        </div>
      ))}
    </dl>
  );
}

/** A two-column table of names and values. */
export function KeyValues({ rows, caption }: { rows: Array<[string, ComponentChildren]>; caption?: string }) {
  return (
    <table class="kv">
      {caption && <caption class="visually-hidden">{caption}</caption>}
      <tbody>
        {rows.map(([k, v]) => (
          <tr key={k}>
            <th scope="row">{k}</th>
            <td>{v}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}
