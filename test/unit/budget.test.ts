import { describe, expect, it } from "vitest";
import { CheckBudgetExceededError, DEFAULT_CHECK_BUDGET_MS, withinBudget } from "../../src/authz/budget.js";
import { loadConfig } from "../../src/config.js";

describe("withinBudget", () => {
  it("settles like the work when the work settles first", async () => {
    await expect(withinBudget(Promise.resolve("allow"), 1000)).resolves.toBe("allow");
    const failure = new Error("store down");
    await expect(withinBudget(Promise.reject(failure), 1000)).rejects.toBe(failure);
  });

  it("rejects with CheckBudgetExceededError, naming the budget, when the work never settles", async () => {
    const never = new Promise<string>(() => undefined);
    const outcome = withinBudget(never, 20);
    await expect(outcome).rejects.toBeInstanceOf(CheckBudgetExceededError);
    await expect(outcome).rejects.toThrow("the check was not decided within its 20 ms budget");
  });

  it("lets an answer that arrived by the time the budget's timer runs win", async () => {
    // A stalled event loop: when it resumes, the budget's timer and the work's answer (here a
    // later timer) are both due, and the budget's runs first. Its rejection waits for
    // setImmediate, after the answer.
    let settle: (value: string) => void = () => undefined;
    const work = new Promise<string>((resolve) => (settle = resolve));
    const outcome = withinBudget(work, 5);
    setTimeout(() => settle("allow"), 6);
    const stalledUntil = Date.now() + 50;
    while (Date.now() < stalledUntil) {
      // the loop is blocked past both timers
    }
    await expect(outcome).resolves.toBe("allow");
  });

  it("defaults to 150 ms, under Envoy's and Istio's 200-250 ms ext_authz timeouts", () => {
    expect(DEFAULT_CHECK_BUDGET_MS).toBe(150);
    expect(loadConfig({}).checkBudgetMs).toBe(150);
    expect(loadConfig({ KEYGATE_CHECK_BUDGET_MS: "80" }).checkBudgetMs).toBe(80);
  });
});
