-- A swarm root's totals: sub-agents spawned and output tokens left, drawn all or nothing
-- and at most once per spawn call, so racing deliveries of one call (a resumed run
-- repeating it, a redelivered twin) never count it twice and no set of spawns in one
-- tree, however concurrent, passes the tree's limits.
--
-- KEYS[1] totals hash  <prefix>:swarm:{<root id>}
--   fields: spawned, budget_left (from the first draw with a budget: the root's),
--   max_total (the first draw's: the root's limit), drawn:<dag id> (one per call drawn)
--
-- ARGV[1] "draw": ARGV[2] the call's dag id  ARGV[3] sub-agents  ARGV[4] max total
--   ARGV[5] tokens  ARGV[6] tree budget (-1: none)  ARGV[7] ttl (s)
--   -> {1, 0} drawn now, {2, 0} drawn before for this call (nothing drawn again),
--      {0, spawned, the tree's limit} over the total, {-1, budget left} over the budget
-- ARGV[1] "give": ARGV[2] tokens
--   A child's unspent budget back to the tree (only while its totals and budget exist)
--   -> budget left, or -1 when there is nothing to give back to
if ARGV[1] == 'give' then
  if redis.call('HEXISTS', KEYS[1], 'budget_left') == 0 then
    return -1
  end
  return redis.call('HINCRBY', KEYS[1], 'budget_left', ARGV[2])
end
local call = 'drawn:' .. ARGV[2]
if redis.call('HEXISTS', KEYS[1], call) == 1 then
  return {2, 0}
end
local n = tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local first = tonumber(redis.call('HGET', KEYS[1], 'max_total') or ARGV[4])
if first < limit then
  limit = first
end
local spawned = tonumber(redis.call('HGET', KEYS[1], 'spawned') or '0')
if spawned + n > limit then
  return {0, spawned, limit}
end
-- A tree with a budget (the root's) charges every spawn in it, whatever the spawning
-- role's own settings say.
local left = redis.call('HGET', KEYS[1], 'budget_left')
if left or tonumber(ARGV[6]) >= 0 then
  left = tonumber(left or ARGV[6])
  if tonumber(ARGV[5]) > left then
    return {-1, left}
  end
  redis.call('HSET', KEYS[1], 'budget_left', left - tonumber(ARGV[5]))
end
redis.call('HSETNX', KEYS[1], 'max_total', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'spawned', n)
redis.call('HSET', KEYS[1], call, n)
redis.call('EXPIRE', KEYS[1], ARGV[7])
return {1, 0}
