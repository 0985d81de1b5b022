// The new-job form: the common fields, each method's own knobs and the training settings
// (both rendered from the OpenAPI document's schemas, knobs.gen.ts), and a raw JSON editor
// merged over the form for everything else. The server validates; its problem+json errors
// appear beside the fields they name. One Idempotency-Key per request body, so a double
// click (or a retry after a lost answer) makes one job.
import { useMemo, useRef, useState } from "preact/hooks";
import { api, unwrap, ApiError, errorMessage } from "../api/client";
import type { Knob } from "../api/knobs";
import { KNOBS } from "../api/knobs.gen";
import { Field, PageHead } from "../components/ui";
import { useCan } from "../identity";
import { deepMerge, formatDefault, isObject, knobObject, knobPlaceholder, knobValue } from "../lib/jobForm";
import { ADAPTIVE_METHODS } from "../lib/methods";
import { fieldId, mapFieldErrors, type FieldErrors } from "../lib/problem";
import { invalidate, useQuery } from "../lib/query";
import { href, navigate, seg } from "../lib/router";
import type { PageProps } from "../main";

/** Starting values that make the form submittable as it opens; every other knob is blank
 * (blank = the server's default). */
const PRESETS: Record<string, Record<string, string>> = {
  lora: { r: "8", alpha: "16", target_modules: "q_proj, v_proj" },
  training: { max_steps: "100", learning_rate: "0.0002", batch_size: "4", seq_len: "512" },
};

type InputMode = "registered" | "uri";

interface FormState {
  adapter_name: string;
  baseMode: InputMode;
  base: string;
  trainMode: InputMode;
  train: string;
  validation: "none" | "uri" | "fraction";
  validationUri: string;
  validationFraction: string;
  method: string;
  methodValues: Record<string, Record<string, string>>;
  training: Record<string, string>;
  parentAdapter: string;
  parentRef: string;
  extra: string;
}

function initialState(query: URLSearchParams): FormState {
  const methodValues: Record<string, Record<string, string>> = {};
  for (const m of KNOBS.methods) methodValues[m.type] = { ...(PRESETS[m.type] ?? {}) };
  return {
    adapter_name: query.get("adapter") ?? "",
    baseMode: "registered",
    base: "",
    trainMode: "registered",
    train: "",
    validation: "none",
    validationUri: "",
    validationFraction: "0.1",
    method: query.get("method") ?? "lora",
    methodValues,
    training: { ...PRESETS.training },
    parentAdapter: query.get("parent") ?? "",
    parentRef: query.get("parent") ? "latest" : "",
    extra: "",
  };
}

function composeBody(f: FormState): { body: Record<string, unknown> | null; extraError: string | null } {
  const methodKnobs = KNOBS.methods.find((m) => m.type === f.method)?.knobs ?? [];
  const dataset: Record<string, unknown> = { train: f.train.trim() };
  if (f.validation === "uri") dataset.validation = f.validationUri.trim();
  if (f.validation === "fraction") dataset.validation_fraction = knobValue({ kind: "number" } as Knob, f.validationFraction);
  const body: Record<string, unknown> = {
    adapter_name: f.adapter_name.trim(),
    base_model: f.base.trim(),
    dataset,
    method: { type: f.method, ...knobObject(methodKnobs, f.methodValues[f.method] ?? {}) },
    training: knobObject(KNOBS.training, f.training),
  };
  if (f.parentAdapter.trim()) body.parent = { adapter: f.parentAdapter.trim(), ref: f.parentRef.trim() || "latest" };
  if (!f.extra.trim()) return { body, extraError: null };
  try {
    const extra: unknown = JSON.parse(f.extra);
    if (!isObject(extra)) return { body: null, extraError: "must be a JSON object, e.g. {\"safety\": {\"enabled\": false}}" };
    return { body: deepMerge(body, extra), extraError: null };
  } catch (e) {
    return { body: null, extraError: `not valid JSON: ${e instanceof Error ? e.message : e}` };
  }
}

/** A random Idempotency-Key; works on plain http too (randomUUID needs a secure context). */
function newIdempotencyKey(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return "ui-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export default function NewJob({ location }: PageProps) {
  const canSubmit = useCan("submit");
  const [form, setForm] = useState<FormState>(() => initialState(location.query));
  const [errors, setErrors] = useState<FieldErrors | null>(null);
  const [busy, setBusy] = useState(false);
  const lastSubmission = useRef<{ body: string; key: string } | null>(null);
  const inFlight = useRef(false);
  const summary = useRef<HTMLDivElement>(null);

  const baseModels = useQuery("inputs/base-models", () => unwrap(api.GET("/v1/base-models")));
  const datasets = useQuery("inputs/datasets", () => unwrap(api.GET("/v1/datasets")));
  const adapters = useQuery("adapters?datalist", () => unwrap(api.GET("/v1/adapters", { params: { query: { limit: 500 } } })));

  const set = (patch: Partial<FormState>) => setForm((f) => ({ ...f, ...patch }));
  const method = KNOBS.methods.find((m) => m.type === form.method) ?? KNOBS.methods[0];

  // Registered inputs are the default choice once they have loaded.
  const baseMode: InputMode = baseModels.data && baseModels.data.length > 0 ? form.baseMode : "uri";
  const trainMode: InputMode = datasets.data && datasets.data.length > 0 ? form.trainMode : "uri";
  const base = baseMode === "registered" && !form.base && baseModels.data?.[0] ? baseModels.data[0].name : form.base;
  const train = trainMode === "registered" && !form.train && datasets.data?.[0] ? datasets.data[0].name : form.train;
  const effective = { ...form, base, train };
  const composed = useMemo(() => composeBody(effective), [form, base, train]);
  const { extraError } = composed;

  const fields = useMemo(() => {
    const f = ["adapter_name", "base_model", "dataset.train", "dataset.validation", "dataset.validation_fraction", "method", "method.type", "parent.adapter", "parent.ref", "extra"];
    for (const k of method.knobs) f.push(`method.${k.name}`);
    for (const k of KNOBS.training) f.push(`training.${k.name}`);
    return f;
  }, [method]);

  const errs = (path: string) => errors?.byField[path];

  const submit = async (e: Event) => {
    e.preventDefault();
    if (inFlight.current) return;
    if (composed.extraError || !composed.body) {
      setErrors({ byField: { extra: [composed.extraError ?? "invalid"] }, general: [] });
      return;
    }
    const text = JSON.stringify(composed.body);
    // The same body again (a double click, a retry) reuses its key: the server answers with
    // the job it already made instead of making another.
    const key = lastSubmission.current?.body === text ? lastSubmission.current.key : newIdempotencyKey();
    lastSubmission.current = { body: text, key };
    inFlight.current = true;
    setBusy(true);
    try {
      const job = await unwrap(
        api.POST("/v1/jobs", {
          // The body was composed from the schema's fields; the server is the judge of it.
          body: composed.body as never,
          headers: { "Idempotency-Key": key },
        }),
      );
      void invalidate("jobs");
      navigate(`/jobs/${seg(job.id)}`);
    } catch (err) {
      const mapped =
        err instanceof ApiError
          ? mapFieldErrors(err.problem, fields)
          : { byField: {}, general: [{ field: "", message: errorMessage(err) }] };
      setErrors(mapped);
      requestAnimationFrame(() => summary.current?.focus());
    } finally {
      inFlight.current = false;
      setBusy(false);
    }
  };

  if (!canSubmit) {
    return (
      <>
        <PageHead title="New job" docTitle="New job" />
        <div class="alert info">This key's scope is read: submitting jobs needs a key with scope submit or admin.</div>
      </>
    );
  }

  const allErrors = errors ? [...Object.entries(errors.byField).flatMap(([f, ms]) => ms.map((m) => ({ field: f, message: m }))), ...errors.general] : [];

  return (
    <>
      <PageHead
        title="New job"
        docTitle="New job"
        crumbs={[{ label: "Jobs", href: href("/jobs") }, { label: "New job" }]}
        sub="Train a new version of an adapter. Blank knobs take the server's defaults."
      />
      {allErrors.length > 0 && (
        <div class="alert error" role="alert" tabIndex={-1} ref={summary} data-testid="error-summary">
          <strong>The server did not accept the job ({allErrors.length} problem{allErrors.length > 1 ? "s" : ""}):</strong>
          <ul>
            {allErrors.map((e, i) => (
              <li key={i}>
                {errors?.byField[e.field] ? <a href={`#${fieldId(e.field)}`} onClick={(ev) => focusField(ev, e.field)}>{e.field}</a> : <code>{e.field || "request"}</code>}: {e.message}
              </li>
            ))}
          </ul>
        </div>
      )}
      <form onSubmit={submit} noValidate aria-label="New job">
        <fieldset>
          <legend>What to train</legend>
          <div class="fields">
            <Field path="adapter_name" label="Adapter name" errors={errs("adapter_name")} help="A new name starts an adapter; an existing one gets its next version.">
              {(a) => <input {...a} list="adapter-names" value={form.adapter_name} onInput={(e) => set({ adapter_name: e.currentTarget.value })} required />}
            </Field>
            <datalist id="adapter-names">
              {adapters.data?.adapters.map((ad) => <option key={ad.name} value={ad.name} />)}
            </datalist>
            <InputChoice
              path="base_model"
              label="Base model"
              mode={baseMode}
              value={base}
              registered={baseModels.data?.map((m) => m.name) ?? []}
              uriHelp="A Hugging Face model directory: file:///…, s3://…"
              errors={errs("base_model")}
              onMode={(m) => set({ baseMode: m, base: "" })}
              onValue={(v) => set({ base: v })}
            />
            <InputChoice
              path="dataset.train"
              label="Training data"
              mode={trainMode}
              value={train}
              registered={datasets.data?.map((d) => d.name) ?? []}
              uriHelp="JSONL of {messages}, {prompt, completion} or {text}"
              errors={errs("dataset.train")}
              onMode={(m) => set({ trainMode: m, train: "" })}
              onValue={(v) => set({ train: v })}
            />
            <Field path="dataset.validation-mode" label="Validation">
              {(a) => (
                <select {...a} value={form.validation} onChange={(e) => set({ validation: e.currentTarget.value as FormState["validation"] })}>
                  <option value="none">None</option>
                  <option value="fraction">Hold out a fraction</option>
                  <option value="uri">A separate file</option>
                </select>
              )}
            </Field>
            {form.validation === "fraction" && (
              <Field path="dataset.validation_fraction" label="Validation fraction" errors={errs("dataset.validation_fraction")}>
                {(a) => <input {...a} inputMode="decimal" value={form.validationFraction} onInput={(e) => set({ validationFraction: e.currentTarget.value })} />}
              </Field>
            )}
            {form.validation === "uri" && (
              <Field path="dataset.validation" label="Validation data" errors={errs("dataset.validation")} help="URI or registered dataset name">
                {(a) => <input {...a} value={form.validationUri} onInput={(e) => set({ validationUri: e.currentTarget.value })} />}
              </Field>
            )}
          </div>
        </fieldset>

        <fieldset>
          <legend>Method</legend>
          <Field path="method.type" label="Adapter method" errors={[...(errs("method.type") ?? []), ...(errs("method") ?? [])]} help={method.description}>
            {(a) => (
              <select {...a} value={form.method} onChange={(e) => set({ method: e.currentTarget.value })}>
                {KNOBS.methods.map((m) => (
                  <option key={m.type} value={m.type}>
                    {m.type}
                    {ADAPTIVE_METHODS.has(m.type) ? " (adaptive rank)" : ""}
                  </option>
                ))}
              </select>
            )}
          </Field>
          <div class="fields" data-testid="method-knobs">
            {method.knobs.map((k) => (
              <KnobField
                key={`${method.type}.${k.name}`}
                knob={k}
                path={`method.${k.name}`}
                value={form.methodValues[method.type]?.[k.name] ?? ""}
                errors={errs(`method.${k.name}`)}
                onValue={(v) =>
                  setForm((f) => ({ ...f, methodValues: { ...f.methodValues, [method.type]: { ...f.methodValues[method.type], [k.name]: v } } }))
                }
              />
            ))}
          </div>
        </fieldset>

        <fieldset>
          <legend>Training</legend>
          <div class="fields">
            {KNOBS.training.map((k) => (
              <KnobField
                key={k.name}
                knob={k}
                path={`training.${k.name}`}
                value={form.training[k.name] ?? ""}
                errors={errs(`training.${k.name}`)}
                onValue={(v) => setForm((f) => ({ ...f, training: { ...f.training, [k.name]: v } }))}
              />
            ))}
          </div>
        </fieldset>

        <fieldset>
          <legend>Continue from a version (optional)</legend>
          <div class="fields">
            <Field path="parent.adapter" label="Parent adapter" errors={errs("parent.adapter")} help="Train on from a published version of the same method and shape.">
              {(a) => <input {...a} list="adapter-names" value={form.parentAdapter} onInput={(e) => set({ parentAdapter: e.currentTarget.value })} />}
            </Field>
            <Field path="parent.ref" label="Parent version" errors={errs("parent.ref")} help="latest, an alias or a version number">
              {(a) => <input {...a} placeholder="latest" value={form.parentRef} onInput={(e) => set({ parentRef: e.currentTarget.value })} />}
            </Field>
          </div>
        </fieldset>

        <fieldset>
          <legend>Raw JSON</legend>
          <Field
            path="extra"
            label="More fields (a JSON object merged over the form)"
            errors={errs("extra") ?? (extraError ? [extraError] : undefined)}
            help={
              <>
                For anything the form does not show, e.g. <code>{'{"safety": {"enabled": false}}'}</code> or{" "}
                <code>{'{"training": {"device": "cpu"}}'}</code>.
              </>
            }
          >
            {(a) => <textarea {...a} spellcheck={false} value={form.extra} onInput={(e) => set({ extra: e.currentTarget.value })} />}
          </Field>
          <details>
            <summary>Request body</summary>
            <pre data-testid="request-preview">{composed.body ? JSON.stringify(composed.body, null, 2) : "–"}</pre>
          </details>
        </fieldset>

        <div class="row">
          <button class="primary" type="submit" disabled={busy} data-testid="submit-job">
            {busy ? "Submitting…" : "Submit job"}
          </button>
          <a class="button" href={href("/jobs")}>
            Cancel
          </a>
        </div>
      </form>
    </>
  );
}

function focusField(e: Event, path: string) {
  e.preventDefault();
  const el = document.getElementById(fieldId(path));
  el?.focus();
  el?.scrollIntoView({ block: "center" });
}

function InputChoice(props: {
  path: string;
  label: string;
  mode: InputMode;
  value: string;
  registered: string[];
  uriHelp: string;
  errors?: string[];
  onMode: (m: InputMode) => void;
  onValue: (v: string) => void;
}) {
  const hasRegistered = props.registered.length > 0;
  return (
    <div>
      {hasRegistered && (
        <div class="segmented" role="group" aria-label={`${props.label}: registered or URI`} style={{ marginBottom: "0.3rem" }}>
          <button type="button" class="small" aria-pressed={props.mode === "registered"} onClick={() => props.onMode("registered")}>
            Registered
          </button>
          <button type="button" class="small" aria-pressed={props.mode === "uri"} onClick={() => props.onMode("uri")}>
            URI
          </button>
        </div>
      )}
      <Field path={props.path} label={props.label} errors={props.errors} help={props.mode === "uri" ? props.uriHelp : "Registered in this project"}>
        {(a) =>
          props.mode === "registered" ? (
            <select {...a} value={props.value} onChange={(e) => props.onValue(e.currentTarget.value)}>
              {props.registered.map((n) => (
                <option key={n} value={n}>
                  {n}
                </option>
              ))}
            </select>
          ) : (
            <input {...a} value={props.value} placeholder="file:///…" onInput={(e) => props.onValue(e.currentTarget.value)} />
          )
        }
      </Field>
    </div>
  );
}

function KnobField(props: { knob: Knob; path: string; value: string; errors?: string[]; onValue: (v: string) => void }) {
  const { knob } = props;
  const label = (
    <>
      <code>{knob.name}</code>
      {knob.required ? " (required)" : ""}
    </>
  );
  const help = knob.description ? firstSentence(knob.description) : undefined;
  return (
    <Field path={props.path} label={label} errors={props.errors} help={help}>
      {(a) => {
        if (knob.kind === "boolean" || knob.kind === "enum") {
          const options = knob.kind === "boolean" ? ["true", "false"] : (knob.options ?? []);
          return (
            <select {...a} value={props.value} onChange={(e) => props.onValue(e.currentTarget.value)}>
              <option value="">{knob.default !== undefined ? `default (${formatDefault(knob.default)})` : "default"}</option>
              {options.map((o) => (
                <option key={o} value={o}>
                  {o}
                </option>
              ))}
              {knob.nullable && <option value="null">null (off)</option>}
            </select>
          );
        }
        return (
          <input
            {...a}
            inputMode={knob.kind === "integer" ? "numeric" : knob.kind === "number" ? "decimal" : undefined}
            placeholder={knobPlaceholder(knob)}
            value={props.value}
            onInput={(e) => props.onValue(e.currentTarget.value)}
          />
        );
      }}
    </Field>
  );
}

function firstSentence(text: string): string {
  const flat = text.replace(/\s+/g, " ").trim();
  const end = flat.search(/\.(\s|$)/);
  return end > 0 ? flat.slice(0, end + 1) : flat;
}
