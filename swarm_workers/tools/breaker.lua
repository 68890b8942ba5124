-- The fleet's circuit breaker for one MCP server: two entry points in one script, so
-- every transition happens atomically on Redis' own clock (TIME), never a worker's.
--
-- KEYS[1]  state hash   {state = closed|open|half_open, opened_at = ms, reason = text}
-- KEYS[2]  probe key    who holds the single half-open probe (SET NX PX, value = token)
-- KEYS[3]  failure zset recent failures, score = ms; trimmed to the window
--
-- ARGV[1] = "allow":
--   ARGV[2] cooldown_ms   ARGV[3] probe_ttl_ms   ARGV[4] token
--   returns {decision, state, wait_ms}: decision 1 = go, 2 = go as the probe, 0 = fail fast
--   (wait_ms: until the cooldown ends, or until the pending probe's lease runs out)
--
-- ARGV[1] = "release":
--   ARGV[2] probe token   frees the half-open probe lease if this token holds it, and
--   changes nothing else: the call never reached the server, so nothing was learned.
--   returns {state, 0}
--
-- ARGV[1] = "record":
--   ARGV[2] outcome "ok"|"fail"   ARGV[3] probe token or ""   ARGV[4] call id (unique)
--   ARGV[5] failures threshold    ARGV[6] window_ms          ARGV[7] reason
--   returns {state, changed}: changed = 1 when this outcome moved the breaker

local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local keep_ms = 7 * 24 * 3600 * 1000

local state = redis.call('HGET', KEYS[1], 'state') or 'closed'

local function trip(reason)
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'reason', reason)
  redis.call('PEXPIRE', KEYS[1], keep_ms)
  redis.call('DEL', KEYS[3])
end

if ARGV[1] == 'allow' then
  if state == 'closed' then
    return {1, 'closed', 0}
  end
  if state == 'open' then
    local opened = tonumber(redis.call('HGET', KEYS[1], 'opened_at')) or 0
    local wait = opened + tonumber(ARGV[2]) - now
    if wait > 0 then
      return {0, 'open', wait}
    end
    redis.call('HSET', KEYS[1], 'state', 'half_open')
    state = 'half_open'
  end
  -- half_open: exactly one caller in the fleet gets to probe; its lease expires if it dies.
  if redis.call('SET', KEYS[2], ARGV[4], 'NX', 'PX', tonumber(ARGV[3])) then
    return {2, 'half_open', 0}
  end
  return {0, 'half_open', math.max(redis.call('PTTL', KEYS[2]), 0)}
end

if ARGV[1] == 'release' then
  if redis.call('GET', KEYS[2]) == ARGV[2] then
    redis.call('DEL', KEYS[2])
  end
  return {state, 0}
end

-- record
local ok = ARGV[2] == 'ok'
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  if state == 'half_open' then
    if ok then
      redis.call('DEL', KEYS[1], KEYS[3])
      return {'closed', 1}
    end
    trip(ARGV[7])
    return {'open', 1}
  end
end
-- Only the probe decides a half-open breaker, and a late outcome of a call that began
-- before the breaker opened changes nothing: only failures while closed count.
if not ok and state == 'closed' then
  redis.call('ZADD', KEYS[3], now, ARGV[4])
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[6]))
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]))
  if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then
    trip(ARGV[7])
    return {'open', 1}
  end
end
return {state, 0}
