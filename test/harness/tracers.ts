import { trace } from "@opentelemetry/api";
import { DecisionTracer } from "../../src/tracing/tracing.js";
import type { DecisionTrace } from "../../src/tracing/tracing.js";

/** A tracer that cannot open a Check's span: a fault before the decision itself. */
export class FailingTracer extends DecisionTracer {
  constructor() {
    super(trace.getTracer("keygate-test"));
  }
  override start(): DecisionTrace {
    throw new Error("tracer down");
  }
}

/** A tracer that opens spans but cannot close one: a fault after the answer is handed over. */
export class UnrecordableTracer extends DecisionTracer {
  constructor() {
    super(trace.getTracer("keygate-test"));
  }
  override finish(): void {
    throw new Error("exporter down");
  }
}
