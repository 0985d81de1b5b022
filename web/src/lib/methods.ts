// What the pages need to know about the adapter methods beyond their knobs (knobs.gen.ts).

/** Methods whose rank moves while they train (or, EVA, is redistributed at the start): the
 * new-job form marks them, and a job's page shows its rank allocation. */
export const ADAPTIVE_METHODS: ReadonlySet<string> = new Set([
  "adalora",
  "sora",
  "dylora",
  "increlora",
  "triadaptlora",
  "codyra",
  "eva",
]);
