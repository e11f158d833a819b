// Arrays cross from Python as {view, dtype, shape} (C order); here they become typed arrays with an index helper.

export interface Wire {
  view: DataView;
  dtype: "float32" | "int32";
  shape: number[];
}

export interface NDArray {
  data: Float32Array | Int32Array;
  shape: number[];
  strides: number[];
}

export function decode(wire: Wire): NDArray {
  const { view, dtype, shape } = wire;
  const Ctor = dtype === "float32" ? Float32Array : dtype === "int32" ? Int32Array : null;
  if (Ctor === null) throw new Error(`opd_lens: unsupported dtype ${dtype}`);
  const n = shape.reduce((a, b) => a * b, 1);
  if (view.byteLength !== n * Ctor.BYTES_PER_ELEMENT) {
    throw new Error(`opd_lens: ${view.byteLength} bytes do not hold a ${dtype} array of shape [${shape}]`);
  }
  // Copy when the view is not aligned for the element type (buffers inside a websocket frame may not be).
  const aligned = view.byteOffset % Ctor.BYTES_PER_ELEMENT === 0;
  const data = aligned
    ? new Ctor(view.buffer as ArrayBuffer, view.byteOffset, n)
    : new Ctor((view.buffer as ArrayBuffer).slice(view.byteOffset, view.byteOffset + view.byteLength));
  const strides = shape.map((_, i) => shape.slice(i + 1).reduce((a, b) => a * b, 1));
  return { data, shape, strides };
}

/** The element at a full index. */
export function at(a: NDArray, ...index: number[]): number {
  let k = 0;
  for (let i = 0; i < index.length; i++) k += index[i] * a.strides[i];
  return a.data[k];
}
