// Listeners that come with their removal, so that every view and panel returns one cleanup for all it added.
import type { AnyModel } from "@anywidget/types";

export type Cleanup = () => void;

/** Call `f` on the model's `event` until the cleanup runs. */
export function onModel(model: Pick<AnyModel, "on" | "off">, event: string, f: () => void): Cleanup {
  model.on(event, f);
  return () => model.off(event, f);
}

/** Call `f` on `target`'s DOM events `type` until the cleanup runs. */
export function onDom<K extends keyof HTMLElementEventMap>(
  target: HTMLElement,
  type: K,
  f: (ev: HTMLElementEventMap[K]) => void,
): Cleanup {
  target.addEventListener(type, f);
  return () => target.removeEventListener(type, f);
}

/** One cleanup that runs all of them. */
export function all(cleanups: Cleanup[]): Cleanup {
  return () => cleanups.forEach((c) => c());
}
