// Test helpers: a minimal anywidget model and a wire array built from numbers.
import type { Wire } from "./codecs";

export class FakeModel<T extends object> {
  saved = 0;
  private listeners = new Map<string, Set<() => void>>();
  constructor(private state: T) {}
  get<K extends keyof T>(key: K): T[K] {
    return this.state[key];
  }
  set<K extends keyof T>(key: K, value: T[K]): void {
    this.state[key] = value;
    for (const f of this.listeners.get(`change:${String(key)}`) ?? []) f();
  }
  on(event: string, f: () => void): void {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    this.listeners.get(event)?.add(f);
  }
  off(event: string, f: () => void): void {
    this.listeners.get(event)?.delete(f);
  }
  /** How many listeners are registered, over all events. */
  get listening(): number {
    return [...this.listeners.values()].reduce((n, s) => n + s.size, 0);
  }
  save_changes(): void {
    this.saved++;
  }
  send(): void {}
}

export function wire(values: number[], shape: number[], dtype: "float32" | "int32" = "float32"): Wire {
  const a = dtype === "float32" ? new Float32Array(values) : new Int32Array(values);
  return { view: new DataView(a.buffer), dtype, shape };
}
