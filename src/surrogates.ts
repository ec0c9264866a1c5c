// Text keygate quotes back to a caller must stay well-formed UTF-16: connect-es percent-encodes a
// gRPC or gRPC-Web error message with encodeURIComponent, which throws on a lone surrogate (the
// answer became a bare HTTP 500), and strict JSON decoders refuse one ("\ud83d") in a Connect error.

/** A surrogate without its other half. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

/** Whether a cut of `text` before index `at` falls between a high and a low surrogate. */
export function splitsSurrogatePair(text: string, at: number): boolean {
  const before = text.charCodeAt(at - 1);
  const after = text.charCodeAt(at);
  return before >= 0xd800 && before <= 0xdbff && after >= 0xdc00 && after <= 0xdfff;
}

/** `text` with each lone surrogate shown as U+FFFD, as a UTF-8 encoder writes it. */
export function withoutLoneSurrogates(text: string): string {
  return text.replace(LONE_SURROGATE, "\uFFFD");
}
