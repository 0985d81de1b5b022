// Who is signed in, for every page: their project and scope decide which actions show.
import { createContext } from "preact";
import { useContext } from "preact/hooks";
import type { Identity } from "./api/client";

export const IdentityContext = createContext<Identity | null>(null);

const RANK = { read: 0, submit: 1, admin: 2 } as const;

/** Whether the signed-in key's scope includes `scope`. */
export function useCan(scope: "read" | "submit" | "admin"): boolean {
  const identity = useContext(IdentityContext);
  return identity !== null && RANK[identity.scope] >= RANK[scope];
}
