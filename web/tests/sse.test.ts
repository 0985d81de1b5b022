import { describe, expect, it } from "vitest";
import { followEvents, SseParser, type SseMessage, type StreamState } from "../src/lib/sse";

describe("SseParser", () => {
  it("assembles messages across chunk boundaries and line endings", () => {
    const parser = new SseParser();
    const text = 'id: 1\ndata: {"a":1}\n\n: keep-alive\n\nid: 2\r\nevent: error\r\ndata: line one\r\ndata: line two\r\n\r\n';
    const messages: SseMessage[] = [];
    // One character at a time: every split point must work, including inside "\r\n".
    for (const ch of text) messages.push(...parser.feed(ch));
    expect(messages).toEqual([
      { id: "1", event: "message", data: '{"a":1}' },
      { id: "2", event: "error", data: "line one\nline two" },
    ]);
  });

  it("keeps an incomplete message until its blank line arrives", () => {
    const parser = new SseParser();
    expect(parser.feed("id: 7\ndata: x")).toEqual([]);
    expect(parser.feed("y\n")).toEqual([]);
    expect(parser.feed("\n")).toEqual([{ id: "7", event: "message", data: "xy" }]);
  });
});

/** A fetch whose answers are scripted: each call takes the next script. */
function scriptedFetch(scripts: Array<(init: RequestInit) => Response>) {
  const calls: Array<Record<string, string>> = [];
  const fetch = async (_url: RequestInfo | URL, init?: RequestInit) => {
    calls.push({ ...(init?.headers as Record<string, string>) });
    const next = scripts.shift();
    if (!next) throw new Error("no more scripted answers");
    return next(init ?? {});
  };
  return { fetch: fetch as typeof globalThis.fetch, calls };
}

/** A streaming 200 that sends `chunks`, then ends cleanly or fails like a dropped connection. */
function stream(chunks: string[], end: "close" | "drop"): Response {
  const encoder = new TextEncoder();
  const queue = [...chunks];
  // One chunk per read, as a network delivers them; erroring a stream drops what is queued.
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      const next = queue.shift();
      if (next !== undefined) controller.enqueue(encoder.encode(next));
      else if (end === "close") controller.close();
      else controller.error(new TypeError("network error"));
    },
  });
  return new Response(body, { status: 200, headers: { "content-type": "text/event-stream" } });
}

const event = (seq: number) => `id: ${seq}\ndata: {"seq":${seq}}\n\n`;
const noSleep = async () => {};

describe("followEvents", () => {
  it("resumes a dropped stream with Last-Event-ID and delivers each event once", async () => {
    const { fetch, calls } = scriptedFetch([
      () => stream([event(1), event(2), "id: 3\ndata: {\"se"], "drop"),
      // A server that resent event 2 must not make it appear twice.
      () => stream([event(2), event(3), event(4)], "close"),
    ]);
    const seen: string[] = [];
    const states: StreamState["state"][] = [];
    await followEvents({
      url: "/v1/jobs/x/events/stream",
      headers: () => ({ Authorization: "Bearer lf_k" }),
      fetch,
      sleep: noSleep,
      onMessage: (m) => seen.push(m.id!),
      onState: (s) => states.push(s.state),
    });
    expect(seen).toEqual(["1", "2", "3", "4"]);
    expect(calls).toHaveLength(2);
    expect(calls[0]["Last-Event-ID"]).toBeUndefined();
    expect(calls[1]["Last-Event-ID"]).toBe("2");
    expect(calls[1].Authorization).toBe("Bearer lf_k");
    expect(states).toEqual(["connecting", "open", "reconnecting", "connecting", "open", "ended"]);
  });

  it("starts after a given id and reconnects after the server's error event", async () => {
    const { fetch, calls } = scriptedFetch([
      () => stream([event(11), "event: error\ndata: reading events failed\n\n"], "close"),
      () => new Response("busy", { status: 503 }),
      () => stream([event(12)], "close"),
    ]);
    const seen: string[] = [];
    const delays: number[] = [];
    await followEvents({
      url: "/s",
      lastEventId: "10",
      fetch,
      retryMs: 100,
      sleep: async (ms) => void delays.push(ms),
      onMessage: (m) => seen.push(m.id!),
    });
    expect(seen).toEqual(["11", "12"]);
    expect(calls.map((c) => c["Last-Event-ID"])).toEqual(["10", "11", "11"]);
    // Backoff doubles while attempts fail in a row.
    expect(delays).toEqual([100, 200]);
  });

  it("reconnects after a clean end while the caller says the job is not final", async () => {
    let final = false;
    const { fetch, calls } = scriptedFetch([
      () => stream([event(1)], "close"),
      () => stream([event(2)], "close"),
    ]);
    const seen: string[] = [];
    await followEvents({
      url: "/s",
      fetch,
      sleep: noSleep,
      resumeAfterEnd: () => !final,
      onMessage: (m) => {
        seen.push(m.id!);
        if (m.id === "2") final = true;
      },
    });
    expect(seen).toEqual(["1", "2"]);
    expect(calls[1]["Last-Event-ID"]).toBe("1");
  });

  it("stops on an answer retrying cannot fix and reports it", async () => {
    const problem = JSON.stringify({ status: 401, code: "unauthorized", detail: "bad key" });
    const { fetch, calls } = scriptedFetch([
      () => new Response(problem, { status: 401, headers: { "content-type": "application/problem+json" } }),
    ]);
    const states: StreamState[] = [];
    await followEvents({ url: "/s", fetch, sleep: noSleep, onMessage: () => {}, onState: (s) => states.push(s) });
    expect(calls).toHaveLength(1);
    expect(states.at(-1)).toEqual({
      state: "failed",
      status: 401,
      body: problem,
      contentType: "application/problem+json",
    });
  });

  it("stops when aborted", async () => {
    const controller = new AbortController();
    const { fetch, calls } = scriptedFetch([
      () => stream([event(1)], "drop"),
      () => stream([event(2)], "close"),
    ]);
    await followEvents({
      url: "/s",
      fetch,
      signal: controller.signal,
      sleep: async () => controller.abort(),
      onMessage: () => {},
    });
    expect(calls).toHaveLength(1);
  });
});
