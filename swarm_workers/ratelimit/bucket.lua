-- Take from several token buckets at once, all or nothing, on Redis' own clock.
--
-- KEYS[1..n]   one hash per bucket; the keys of one call share a hash tag
--              ({swarm:rl:<model>}) so the script runs on Redis Cluster.
--              Fields: lvl   units held at ts (negative: debt from an overrun)
--                      ts    microseconds, Redis TIME; refill starts here
--                      until microseconds; no take succeeds before it (a provider 429)
--              A missing key is a full bucket; every write sets PEXPIRE to the time the
--              bucket needs to refill to full (+1 s, at most 30 days), so an idle key
--              disappears when it would read as full anyway.
-- ARGV[1]      op: "take", "adjust", "block" or "peek"
-- ARGV[2+4(i-1)..5+4(i-1)]  bucket i: capacity, refill per second, reserve, amount
--     take     amount: units to take. Every bucket must hold, after the take, at least
--              min(reserve, capacity - amount) (the priority's reserve, capped so that any
--              amount <= capacity fits a full bucket). An amount of 0 only honours `until`.
--     adjust   amount: signed units to add. > 0 gives back (never above capacity, and
--              dropped while the bucket is blocked); < 0 charges (may go into debt).
--              reserve is ignored.
--     block    amount: microseconds. until := max(until, now + amount); the bucket is
--              drained (lvl := min(lvl, 0)) and refills from until. 0 leaves it alone.
--     peek     amount and reserve ignored; writes nothing.
--
-- Returns {status, wait_us, bucket}:
--     take     { 1, 0,       0} taken from every bucket
--              { 0, wait_us, i} nothing taken; bucket i needs the longest, wait_us
--                               (rounded up) until it can give what was asked
--              {-1, 0,       i} nothing taken; amount exceeds bucket i's capacity
--     adjust, block  {1, 0, 0}
--     peek     {lvl_1, ..., lvl_n} each bucket's level now, as a string ("%.6f")

-- Needs Redis >= 5 (effects replication by default: TIME before a write is allowed).
local op = ARGV[1]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local n = #KEYS
local cap, rate, reserve, amount = {}, {}, {}, {}
local lvl, ts, till = {}, {}, {}

for i = 1, n do
  local a = 2 + 4 * (i - 1)
  cap[i] = tonumber(ARGV[a])
  rate[i] = tonumber(ARGV[a + 1]) / 1000000 -- per microsecond
  reserve[i] = tonumber(ARGV[a + 2])
  amount[i] = tonumber(ARGV[a + 3])
  local h = redis.call('HMGET', KEYS[i], 'lvl', 'ts', 'until')
  local l, s = tonumber(h[1]), tonumber(h[2])
  if l == nil or s == nil then
    l, s = cap[i], now
  end
  if now > s then -- continuous refill; a clock that went back (failover) refills nothing
    l = math.min(cap[i], l + (now - s) * rate[i])
    s = now
  end
  lvl[i], ts[i], till[i] = l, s, tonumber(h[3]) or 0
end

-- Numbers are written as strings formatted here: times as integers, levels to 1e-6.
local function save(i)
  local refill_us = (ts[i] - now) + (cap[i] - lvl[i]) / rate[i] -- until full again
  local ttl_ms = math.min(math.ceil(refill_us / 1000), 2592000000)
  redis.call('HSET', KEYS[i], 'lvl', string.format('%.6f', lvl[i]),
    'ts', string.format('%d', ts[i]), 'until', string.format('%d', till[i]))
  redis.call('PEXPIRE', KEYS[i], string.format('%d', ttl_ms + 1000)) -- at most 30 days
end

if op == 'take' then
  local wait, worst = 0, 0
  for i = 1, n do
    if amount[i] > cap[i] then
      return {-1, 0, i}
    end
    local w = 0
    if till[i] > now then
      w = till[i] - now -- blocked: lvl refills only from ts (= until)
    end
    if amount[i] > 0 then
      local need = amount[i] + math.min(reserve[i], cap[i] - amount[i])
      if lvl[i] < need then
        w = w + (need - lvl[i]) / rate[i]
      end
    end
    if w > wait then
      wait, worst = w, i
    end
  end
  if wait > 0 then
    return {0, math.ceil(wait), worst}
  end
  for i = 1, n do
    if amount[i] ~= 0 then
      lvl[i] = lvl[i] - amount[i]
      save(i)
    end
  end
  return {1, 0, 0}
elseif op == 'adjust' then
  for i = 1, n do
    local d = amount[i]
    if d < 0 or (d > 0 and till[i] <= now) then
      lvl[i] = math.min(cap[i], lvl[i] + d)
      save(i)
    end
  end
  return {1, 0, 0}
elseif op == 'block' then
  for i = 1, n do
    local t = now + amount[i]
    if amount[i] > 0 and t > till[i] then
      till[i] = t
      lvl[i] = math.min(lvl[i], 0)
      ts[i] = math.max(ts[i], t)
      save(i)
    end
  end
  return {1, 0, 0}
elseif op == 'peek' then
  local levels = {}
  for i = 1, n do
    levels[i] = string.format('%.6f', lvl[i])
  end
  return levels
end
return redis.error_reply('bucket.lua: unknown op ' .. tostring(op))
