import type { OutgoingHttpHeaders, ServerHttp2Stream } from "node:http2";

/**
 * OK trailers in the turn that ends the answer's DATA, not one turn later.
 *
 * node:http2 asks for trailers ('wantTrailers') from inside nghttp2, when the DATA has run out,
 * during a write it runs from a native setImmediate. Its `sendTrailers` then defers the submission
 * once more, to a JS `setImmediate` (its source: "so we don't do it on nghttp2 stack"), and the
 * write that carries the trailers is scheduled from there: a whole further turn of the event loop
 * for every gRPC answer (another poll, timers and immediates). nghttp2 documents
 * `nghttp2_submit_trailer` as callable from inside the data source callback that raises
 * 'wantTrailers', and the stream's native handle exposes exactly that call, so keygate submits the
 * fixed OK trailers there: they go out in the same turn, one write after the HEADERS and DATA.
 *
 * What this leans on is not public API: the stream's handle (under the `kHandle` symbol) and its
 * `trailers(list)`, which takes the header list node:http2 builds (`name\0value\0flags` per
 * field, and the count). So it is used only on the Node majors listed here, whose sources were read
 * for it and on which the gRPC conformance suite passes; anything else, or a handle that is not as
 * expected, takes the public `sendTrailers`. A refused submission is what node:http2's own would
 * do with it: the stream is destroyed (the client sees a reset, never a wrong status).
 */
const NODE_MAJORS_READ = new Set(["24", "26"]);
// grpc-status: 0 for the public API, and as node:http2's header list: no flags
// (NGHTTP2_NV_FLAG_NONE as one character), one field.
const OK_TRAILERS: OutgoingHttpHeaders = Object.freeze({ "grpc-status": "0" });
const OK_TRAILER_LIST: readonly [string, number] = Object.freeze(["grpc-status\u00000\u0000\u0000", 1] as const);

interface StreamHandle {
  trailers(list: readonly [string, number]): number;
}

/** The handle symbol once found; null when this Node is not one of the majors above or has none. */
let handleSymbol: symbol | null | undefined = NODE_MAJORS_READ.has(process.versions.node.split(".")[0] ?? "") ? undefined : null;

function handleOf(stream: ServerHttp2Stream): StreamHandle | null {
  if (handleSymbol === undefined) handleSymbol = Object.getOwnPropertySymbols(stream).find((symbol) => symbol.description === "kHandle") ?? null;
  if (handleSymbol === null) return null;
  const handle = (stream as unknown as Record<symbol, unknown>)[handleSymbol];
  if (typeof handle !== "object" || handle === null || typeof (handle as Partial<StreamHandle>).trailers !== "function") return null;
  return handle as StreamHandle;
}

/**
 * Sends `grpc-status: 0` as the stream's trailers. Call it from the stream's 'wantTrailers'
 * event: there it is submitted at once; through the public `sendTrailers` where this Node's handle
 * is not the one described above.
 */
export function sendOkTrailers(stream: ServerHttp2Stream): void {
  const handle = handleOf(stream);
  if (handle === null) {
    stream.sendTrailers(OK_TRAILERS);
    return;
  }
  if (handle.trailers(OK_TRAILER_LIST) < 0) stream.destroy();
}
