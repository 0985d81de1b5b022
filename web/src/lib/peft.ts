// What the UI reads from a version's adapter_config.json (PEFT's LoRA config).

export interface PeftConfig {
  r?: number;
  lora_alpha?: number;
  rank_pattern?: Record<string, number>;
  alpha_pattern?: Record<string, number>;
  target_modules?: string[] | string;
}

/** A module's rank as exported: its `rank_pattern` entry, else the config's `r` if the
 * module is one the config targets (PEFT matches `target_modules` by name suffix), else
 * none: the version does not adapt it. */
export function rankOf(c: PeftConfig | null | undefined, module: string): number | null {
  if (!c) return null;
  const own = c.rank_pattern?.[module];
  if (own !== undefined) return own;
  const targets = typeof c.target_modules === "string" ? [c.target_modules] : (c.target_modules ?? []);
  const name = module.slice(module.lastIndexOf(".") + 1);
  return targets.includes(name) && c.r !== undefined ? c.r : null;
}
