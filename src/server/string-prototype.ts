/**
 * String.prototype back in V8's fast mode, after a module made it the prototype of a class.
 *
 * ioredis's RESP3 decoder defines `class VerbatimString extends String`. An object that becomes
 * another's prototype is turned into a dictionary (a hash table of its properties) until a
 * property lookup through an object that inherits from it makes it fast again, and lookups on
 * primitive strings never do. So from ioredis's import on, every method read from a string
 * (`value.charCodeAt`, in keygate's wire decoder and encoder, node:http2's header handling and
 * everything else) was a lookup optimized code could not fold into a constant: a call into V8's
 * generic LoadIC, 8 to 10 % of a cached Check's CPU under perf.
 *
 * A few lookups through an object made from String.prototype, from a function that has collected
 * type feedback, let V8 make it fast again. The loop is longer than the number of calls after
 * which V8 gives a function its feedback (8 in Node 24). test/unit/string-prototype.test.ts checks
 * the effect with V8's own test of an object's mode.
 */
export function restoreFastStringPrototype(): void {
  const probe = Object.create(String.prototype) as { charCodeAt: unknown };
  for (let i = 0; i < PROBE_LOOKUPS; i++) lookUp(probe);
}

const PROBE_LOOKUPS = 64;

function lookUp(probe: { charCodeAt: unknown }): unknown {
  return probe.charCodeAt;
}
