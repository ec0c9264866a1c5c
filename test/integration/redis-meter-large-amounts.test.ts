import { afterAll, beforeAll, expect, it } from "vitest";
import { MAX_AMOUNT } from "../../src/config.js";
import { MemoryMeter } from "../../src/limits/memory.js";
import { RedisMeter } from "../../src/limits/redis.js";
import { requireServer } from "../harness/ports.js";
import { chargeInput, startRedisWithClient, stubMeterDeps } from "../harness/redis-charge.js";
import type { RedisWithClient } from "../harness/redis-charge.js";
import { redisAvailable } from "../harness/redis-server.js";

// The charge script computes balances exactly (Lua doubles), but ioredis reads an integer reply
// digit by digit as number * 10 + byte - 48, which rounds once number * 10 + byte passes 2^53:
// the top ~57 integers below 2^53 came back wrong, so with monthlyCredits 2^53 - 1 (an "unlimited"
// an operator may write) X-Credits-Remaining and a refusal's balance differed by one from the
// in-process meter's. The policy now stops allowances and quotas at MAX_AMOUNT (10^15,
// test/unit/config-number-bounds.test.ts); this holds that bound to what the Redis meter reads back.
const ready = requireServer("redis-server", redisAvailable(), "apt-get install redis-server");

let r: RedisWithClient;
beforeAll(async () => {
  if (ready) r = await startRedisWithClient();
});
afterAll(async () => {
  await r?.stop();
});

it.runIf(ready)("the Redis meter reports the same balances as the in-process meter at the largest allowance and quota", async () => {
  const deps = stubMeterDeps();
  const memory = new MemoryMeter(deps.store, deps.usage);
  const redis = new RedisMeter(r.client, deps.store, deps.usage, new MemoryMeter(deps.store, deps.usage), "fail-closed", deps.logger);
  const input = { ...chargeInput("large-amounts"), dailyQuota: MAX_AMOUNT, monthlyCredits: MAX_AMOUNT, cost: 2 };
  const answers = [];
  for (const meter of [memory, redis]) {
    const { credits, quota } = await meter.charge(input);
    answers.push({ balance: credits?.balance, quotaLeft: quota?.remaining });
  }
  const expected = { balance: MAX_AMOUNT - 2, quotaLeft: MAX_AMOUNT - 1 };
  expect(answers).toEqual([expected, expected]);
});
