// The shape of the generated knob table (knobs.gen.ts): each adapter method's parameters
// and the training settings, as the OpenAPI document describes them.

export type KnobKind = "integer" | "number" | "boolean" | "string" | "list" | "enum";

export interface Knob {
  name: string;
  kind: KnobKind;
  required: boolean;
  /** The server accepts `null` (e.g. `checkpoint_every: null` turns checkpoints off). */
  nullable: boolean;
  description: string;
  minimum?: number | null;
  options?: string[];
  /** What the server uses when the knob is left out (the document's `default`), if any. */
  default?: unknown;
}

export interface MethodKnobs {
  type: string;
  description: string;
  knobs: Knob[];
}

export interface KnobTable {
  methods: MethodKnobs[];
  training: Knob[];
}
