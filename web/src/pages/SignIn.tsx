// Sign-in: the key is checked with `GET /v1/me` before it is kept (in session storage).
import { useState } from "preact/hooks";
import { api, unwrap, errorMessage, type Identity } from "../api/client";
import { Field, PageHead } from "../components/ui";
import type { Problem } from "../lib/problem";
import { storeKey } from "../lib/session";

export function SignIn(props: { problem: Problem | null; onSignedIn: (identity: Identity) => void }) {
  const [key, setKey] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);

  const submit = async (e: Event) => {
    e.preventDefault();
    const trimmed = key.trim();
    if (!trimmed) {
      setError("Enter an API key.");
      return;
    }
    setBusy(true);
    setError(null);
    try {
      const identity = await unwrap(api.GET("/v1/me", { headers: { Authorization: `Bearer ${trimmed}` } }), {
        authRedirect: false,
      });
      storeKey(trimmed);
      props.onSignedIn(identity);
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <div class="signin">
      <PageHead title="Sign in" docTitle="Sign in" sub="Use an API key of your project." />
      {props.problem && !error && (
        <div class="alert error" role="alert">
          The server refused the request: {props.problem.detail}
        </div>
      )}
      <form class="panel" onSubmit={submit} noValidate>
        <Field
          path="api_key"
          label="API key"
          errors={error ? [error] : undefined}
          help={
            <>
              Create one with <code>loraforge keys create --project NAME --scope submit</code>. It is kept in this tab's
              session storage only.
            </>
          }
        >
          {(attrs) => (
            <input
              {...attrs}
              type="password"
              autocomplete="off"
              spellcheck={false}
              placeholder="lf_…"
              value={key}
              onInput={(e) => setKey(e.currentTarget.value)}
            />
          )}
        </Field>
        <button class="primary" type="submit" disabled={busy}>
          {busy ? "Checking…" : "Sign in"}
        </button>
      </form>
    </div>
  );
}
