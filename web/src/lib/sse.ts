// Server-sent events over fetch, so the request can carry the API key (EventSource cannot
// send headers). One function follows a stream and resumes it after a dropped connection
// with `Last-Event-ID`, the id of the last event it delivered, so nothing is lost and
// nothing is delivered twice.

export interface SseMessage {
  id: string | null;
  event: string;
  data: string;
}

/** The text/event-stream grammar: feed it chunks as they arrive, get whole messages back. */
export class SseParser {
  private buffer = "";
  private data: string[] = [];
  private event = "";
  private id: string | null = null;
  private sawField = false;

  feed(chunk: string): SseMessage[] {
    this.buffer += chunk;
    const messages: SseMessage[] = [];
    for (;;) {
      const match = /\r\n|\r|\n/.exec(this.buffer);
      // A lone trailing \r may be the first half of \r\n: wait for the next chunk.
      if (!match || (match[0] === "\r" && match.index === this.buffer.length - 1)) break;
      const line = this.buffer.slice(0, match.index);
      this.buffer = this.buffer.slice(match.index + match[0].length);
      const message = this.line(line);
      if (message) messages.push(message);
    }
    return messages;
  }

  private line(line: string): SseMessage | null {
    if (line === "") {
      if (!this.sawField) return null;
      const message = { id: this.id, event: this.event || "message", data: this.data.join("\n") };
      this.data = [];
      this.event = "";
      this.id = null;
      this.sawField = false;
      return message;
    }
    if (line.startsWith(":")) return null; // a comment: keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    this.sawField = true;
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.id = value;
    return null;
  }
}

export type StreamState =
  | { state: "connecting" }
  | { state: "open" }
  | { state: "reconnecting"; attempt: number; delayMs: number; reason: string }
  | { state: "ended" }
  | { state: "failed"; status: number; body: string; contentType: string | null };

export interface FollowOptions {
  url: string;
  /** Headers of every (re)connection, read each time (the key may change). */
  headers?: () => Record<string, string>;
  /** Resume after this event id, as if it had been delivered. */
  lastEventId?: string | null;
  onMessage: (message: SseMessage) => void;
  onState?: (state: StreamState) => void;
  /**
   * Called when the server ends the stream: true to reconnect anyway. The events stream
   * ends once its job is final, so the caller says whether the job is; a proxy that
   * closes the connection early then does not end the watch.
   */
  resumeAfterEnd?: () => boolean;
  signal?: AbortSignal;
  fetch?: typeof fetch;
  /** First reconnection delay; doubles up to `maxRetryMs`. */
  retryMs?: number;
  maxRetryMs?: number;
  sleep?: (ms: number, signal?: AbortSignal) => Promise<void>;
}

/** Answers that retrying cannot fix: stop and report them. */
const FINAL_STATUSES = new Set([400, 401, 403, 404, 410, 422]);

/**
 * Follows the stream until the server ends it (and `resumeAfterEnd` says not to go on),
 * `signal` aborts, or the server answers with an error retrying cannot fix. A dropped
 * connection, a 5xx or the server's own `error` event reconnect with `Last-Event-ID`.
 */
export async function followEvents(options: FollowOptions): Promise<void> {
  const doFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  const sleep = options.sleep ?? abortableSleep;
  const baseDelay = options.retryMs ?? 1000;
  const maxDelay = options.maxRetryMs ?? 15000;
  const report = options.onState ?? (() => {});
  let lastId: string | null = options.lastEventId ?? null;
  let failures = 0;

  while (!options.signal?.aborted) {
    report({ state: "connecting" });
    let reason: string;
    try {
      const headers: Record<string, string> = { Accept: "text/event-stream", ...options.headers?.() };
      if (lastId !== null) headers["Last-Event-ID"] = lastId;
      const response = await doFetch(options.url, { headers, signal: options.signal, cache: "no-store" });
      if (!response.ok) {
        const body = await response.text().catch(() => "");
        if (FINAL_STATUSES.has(response.status)) {
          report({ state: "failed", status: response.status, body, contentType: response.headers.get("content-type") });
          return;
        }
        throw new Error(`HTTP ${response.status}`);
      }
      if (!response.body) throw new Error("the answer has no body");
      report({ state: "open" });
      const parser = new SseParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let serverError: string | null = null;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const message of parser.feed(value)) {
          if (message.event === "error") {
            // The server could not read further events; it ends the stream next.
            serverError = message.data || "the server reported an error";
            continue;
          }
          if (message.id !== null) {
            if (lastId !== null && isNotAfter(message.id, lastId)) continue;
            lastId = message.id;
          }
          failures = 0;
          options.onMessage(message);
        }
      }
      if (serverError === null && !(options.resumeAfterEnd?.() ?? false)) {
        report({ state: "ended" });
        return;
      }
      reason = serverError ?? "the stream ended early";
    } catch (e) {
      if (options.signal?.aborted) return;
      reason = e instanceof Error ? e.message : String(e);
    }
    failures += 1;
    const delayMs = Math.min(maxDelay, baseDelay * 2 ** (failures - 1));
    report({ state: "reconnecting", attempt: failures, delayMs, reason });
    await sleep(delayMs, options.signal);
  }
}

/** Event ids are the job's sequence numbers: an id at or before `last` was delivered. */
function isNotAfter(id: string, last: string): boolean {
  const a = Number(id);
  const b = Number(last);
  return Number.isFinite(a) && Number.isFinite(b) && a <= b;
}

function abortableSleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
    signal?.addEventListener("abort", done);
  });
}
