import { isMessage } from "@bufbuild/protobuf";
import { TimestampSchema } from "@bufbuild/protobuf/wkt";
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { z } from "zod";

// The shapes the option parsers in parsers.ts produce, for checking commander's `any` output.

/** A Timestamp message, as `instant()` returns it. */
export const timestamp = z.custom<Timestamp>((value) => isMessage(value, TimestampSchema), "expected a Timestamp");

/** A rate limit, as `rateLimit()` returns it. */
export const rateLimitValue = z.object({ limit: z.number(), windowSeconds: z.number() });

/** A repeatable string option. */
export const strings = z.array(z.string());

/** One positional id. */
export const oneId = z.tuple([z.string()]);
