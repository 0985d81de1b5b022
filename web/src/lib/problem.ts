// The one place where the server's `application/problem+json` answers (RFC 9457 with a
// stable `code`, the first offending `field` and every problem in `errors`) become what
// the UI shows: messages next to the form fields they name, and the rest as a summary.

export interface FieldError {
  field: string;
  message: string;
}

export interface Problem {
  type: string;
  title: string;
  status: number;
  code: string;
  detail: string;
  field?: string;
  errors: FieldError[];
}

/** A problem from an HTTP answer; a body that is not a problem document still gives one. */
export function parseProblem(status: number, contentType: string | null, body: string): Problem {
  const fallback: Problem = {
    type: "about:blank",
    title: statusTitle(status),
    status,
    code: status === 0 ? "network" : `http_${status}`,
    detail: body.trim().slice(0, 500) || (status === 0 ? statusTitle(status) : `${statusTitle(status)} (HTTP ${status}) without details`),
    errors: [],
  };
  const json = contentType?.includes("json") ?? false;
  if (!json || !body) return fallback;
  let parsed: unknown;
  try {
    parsed = JSON.parse(body);
  } catch {
    return fallback;
  }
  if (typeof parsed !== "object" || parsed === null) return fallback;
  const p = parsed as Record<string, unknown>;
  const str = (v: unknown, d: string) => (typeof v === "string" ? v : d);
  const errors = Array.isArray(p.errors)
    ? p.errors
        .filter((e): e is Record<string, unknown> => typeof e === "object" && e !== null)
        .map((e) => ({ field: str(e.field, ""), message: str(e.message, "") }))
    : [];
  return {
    type: str(p.type, fallback.type),
    title: str(p.title, fallback.title),
    status: typeof p.status === "number" ? p.status : status,
    code: str(p.code, fallback.code),
    detail: str(p.detail, fallback.detail),
    field: typeof p.field === "string" ? p.field : undefined,
    errors,
  };
}

function statusTitle(status: number): string {
  if (status === 0) return "The server could not be reached";
  if (status >= 500) return "Server error";
  return `HTTP ${status}`;
}

export interface FieldErrors {
  /** Messages by the form field they belong to (one of `fields`). */
  byField: Record<string, string[]>;
  /** Problems no field of the form shows: named by the summary instead. */
  general: FieldError[];
}

/**
 * Assigns each of the problem's errors to the form field that shows it: the field of the
 * same path, else the nearest enclosing one (`method.target_modules[1]` goes to
 * `method.target_modules`, `training.warmup_steps` to `training` if only that is shown).
 * What matches no field (an empty path, a header such as `Idempotency-Key`) is general.
 * A problem without `errors` (a conflict, a 404) is one general message.
 */
export function mapFieldErrors(problem: Problem, fields: Iterable<string>): FieldErrors {
  const known = new Set(fields);
  const byField: Record<string, string[]> = {};
  const general: FieldError[] = [];
  const errors: FieldError[] = problem.errors.length
    ? problem.errors
    : [{ field: problem.field ?? "", message: problem.detail }];
  for (const error of errors) {
    const target = enclosingField(error.field, known);
    if (target === null) {
      general.push(error);
    } else {
      (byField[target] ??= []).push(error.message);
    }
  }
  return { byField, general };
}

function enclosingField(path: string, known: Set<string>): string | null {
  let current = path;
  while (current) {
    if (known.has(current)) return current;
    const cut = Math.max(current.lastIndexOf("."), current.lastIndexOf("["));
    if (cut <= 0) return null;
    current = current.slice(0, cut);
  }
  return null;
}

/** The DOM id of a form field's input, so summaries can link to it. */
export function fieldId(path: string): string {
  return "f-" + path.replace(/[^A-Za-z0-9_-]/g, "-");
}
