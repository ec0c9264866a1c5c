/**
 * A request's headers by lowercase name, as the pipeline reads them: Node's req.headers in the
 * HTTP mode (RecordHeaders), the Check request's own in gRPC (HeaderList). A value is an array
 * when a repeated header was kept apart (HTTP mode, Envoy's header_map), which the credential
 * step refuses.
 */
export interface HeaderBag {
  /** The value of the header `name` (lowercase), or undefined when the request has none. */
  get(name: string): string | readonly string[] | undefined;
  /** Every name the request carries, once each. Shared: do not mutate. */
  names(): readonly string[];
}

/** Headers held as an object of own properties, name to value (Node's req.headers). */
export class RecordHeaders implements HeaderBag {
  readonly #record: Readonly<Record<string, string | readonly string[] | undefined>>;
  #names: readonly string[] | undefined;

  constructor(record: Readonly<Record<string, string | readonly string[] | undefined>>) {
    this.#record = record;
  }

  get(name: string): string | readonly string[] | undefined {
    // Own properties only: a name such as "constructor" is never read off a prototype.
    return Object.hasOwn(this.#record, name) ? this.#record[name] : undefined;
  }

  names(): readonly string[] {
    this.#names ??= Object.keys(this.#record);
    return this.#names;
  }
}

/** Headers as parallel lists of names and values. Up to INDEX_FROM names a lookup is a scan. */
const INDEX_FROM = 16;

/**
 * The headers of a Check request, in the order they first came, a repeated name holding its last
 * value (as a proto3 map reads). Built by appending (check-request.ts): two small arrays where an
 * object would be a hash table grown entry by entry, about a kilobyte and a half a request. Names
 * are the decoder's canonical copies, so a lookup by a literal name compares pointers; a request
 * with more than INDEX_FROM names gets a Map, so a flood of headers costs a step each, not their
 * square.
 *
 * A short ASCII value is kept as where it sits in the request's text (setAt) and cut from it the
 * first time it is read: a Check reads two or three of a request's values.
 */
export class HeaderList implements HeaderBag {
  readonly #names: string[] = [];
  /** A value, or the position in #text of a value's one-byte length (the value follows it). */
  readonly #values: Array<string | number> = [];
  #index: Map<string, number> | undefined;
  /** The request's bytes as latin1 text, which setAt's positions are in. */
  #text = "";

  /** Sets `name` to `value`: appended when new, else the earlier value is replaced. */
  set(name: string, value: string): void {
    this.#put(name, value);
  }

  /**
   * Sets `name` to the ASCII value at `at` in `text` (the request's bytes as latin1): its length
   * (under 128) is the character at `at`, the value the characters after it. All of a list's
   * positions are in one text.
   */
  setAt(name: string, text: string, at: number): void {
    this.#text = text;
    this.#put(name, at);
  }

  get(name: string): string | undefined {
    const at = this.#find(name);
    return at === -1 ? undefined : this.#value(at);
  }

  names(): readonly string[] {
    return this.#names;
  }

  /** The values, in names()' order. */
  values(): string[] {
    return this.#names.map((_, i) => this.#value(i));
  }

  get size(): number {
    return this.#names.length;
  }

  #put(name: string, value: string | number): void {
    const at = this.#find(name);
    if (at !== -1) {
      this.#values[at] = value;
      return;
    }
    const names = this.#names;
    this.#index?.set(name, names.length);
    names.push(name);
    this.#values.push(value);
    if (this.#index === undefined && names.length > INDEX_FROM) this.#index = new Map(names.map((n, i) => [n, i]));
  }

  #value(i: number): string {
    const value = this.#values[i] as string | number;
    if (typeof value === "string") return value;
    const from = value + 1;
    const text = this.#text.substring(from, from + this.#text.charCodeAt(value));
    this.#values[i] = text;
    return text;
  }

  #find(name: string): number {
    if (this.#index !== undefined) return this.#index.get(name) ?? -1;
    const names = this.#names;
    for (let i = 0; i < names.length; i++) if (names[i] === name) return i;
    return -1;
  }
}

/** A request without headers. */
export const NO_HEADERS: HeaderBag = new RecordHeaders(Object.freeze(Object.create(null) as Record<string, string>));
