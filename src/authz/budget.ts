/**
 * The default time a Check may take, backends included: under the 200–250 ms after which Envoy's
 * and Istio's ext_authz give up, so keygate's answer (UNAVAILABLE, a fail-closed 503) arrives while
 * the proxy still waits, and keygate's metrics count what the client saw.
 */
export const DEFAULT_CHECK_BUDGET_MS = 150;

/** A Check ran out of its budget before its backends answered; it is answered UNAVAILABLE. */
export class CheckBudgetExceededError extends Error {
  constructor(budgetMs: number) {
    super(`the check was not decided within its ${budgetMs} ms budget`);
    this.name = "CheckBudgetExceededError";
  }
}

/**
 * Set once a Check's budget has run out and it was answered UNAVAILABLE: work not yet begun for it
 * is not begun. A Check's ChargeInput is one, so the meter learns it without an object of its own.
 */
export interface BudgetState {
  budgetExpired: boolean;
}

/**
 * Settles like `work`, or rejects with CheckBudgetExceededError once `budgetMs` has passed, and
 * then marks `state` expired (in the same turn, before anything hears the rejection). The
 * abandoned work settles later on its own deadline; its failure is not reported twice.
 */
export function withinBudget<T>(work: Promise<T>, budgetMs: number, state?: BudgetState): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    // Node runs due timers before it reads sockets: after a stalled event loop the budget's timer
    // and a backend's answer can both be due. setImmediate runs after the sockets are read, so an
    // answer that did arrive in time wins.
    const timer = setTimeout(
      () =>
        setImmediate(() => {
          if (state !== undefined) state.budgetExpired = true;
          reject(new CheckBudgetExceededError(budgetMs));
        }),
      budgetMs,
    );
    work.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}
