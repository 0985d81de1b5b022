// The typed API client: every path, parameter and answer comes from the OpenAPI document
// (schema.d.ts, generated), so the UI and the server cannot drift. Every request carries
// the session's key; every failure becomes an `ApiError` holding the server's problem, and
// a 401 or 403 also tells the app to send the user back to sign-in.
import createClient from "openapi-fetch";
import { parseProblem, type Problem } from "../lib/problem";
import { storedKey } from "../lib/session";
import type { components, paths } from "./schema";

export type Schemas = components["schemas"];
export type JobView = Schemas["JobView"];
export type JobSummary = Schemas["JobSummary"];
export type EventView = Schemas["EventView"];
export type VersionView = Schemas["VersionView"];
export type Identity = Schemas["Identity"];

export class ApiError extends Error {
  constructor(readonly problem: Problem) {
    super(problem.detail);
  }
  get status() {
    return this.problem.status;
  }
}

let authFailed: ((problem: Problem) => void) | null = null;

/** Who to tell when the server refuses the key (the app shows sign-in). */
export function onAuthFailure(handler: (problem: Problem) => void) {
  authFailed = handler;
}

export function authHeaders(key: string | null = storedKey()): Record<string, string> {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export const api = createClient<paths>({ baseUrl: "" });
api.use({
  onRequest({ request }) {
    const key = storedKey();
    if (key && !request.headers.has("Authorization")) request.headers.set("Authorization", `Bearer ${key}`);
    return request;
  },
});

interface Answer<T> {
  data?: T;
  error?: unknown;
  response: Response;
}

/** The answer's data, or an `ApiError` with the server's problem. */
export async function unwrap<T>(call: Promise<Answer<T>>, options: { authRedirect?: boolean } = {}): Promise<T> {
  let answer: Answer<T>;
  try {
    answer = await call;
  } catch (e) {
    throw new ApiError(parseProblem(0, null, e instanceof Error ? e.message : ""));
  }
  const { response } = answer;
  if (response.ok) return answer.data as T;
  const body = typeof answer.error === "string" ? answer.error : JSON.stringify(answer.error ?? "");
  const problem = parseProblem(response.status, response.headers.get("content-type"), body);
  if ((response.status === 401 || response.status === 403) && options.authRedirect !== false) authFailed?.(problem);
  throw new ApiError(problem);
}

/** Reports a failed answer of a raw `fetch` (downloads, the event stream) like `unwrap`. */
export function failedAnswer(status: number, contentType: string | null, body: string): ApiError {
  const problem = parseProblem(status, contentType, body);
  if (status === 401 || status === 403) authFailed?.(problem);
  return new ApiError(problem);
}

export function errorMessage(e: unknown): string {
  if (e instanceof ApiError) return e.problem.detail || e.problem.title;
  if (e instanceof Error) return e.message;
  return String(e);
}
