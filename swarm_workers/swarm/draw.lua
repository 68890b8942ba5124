-- Draw sub-agents and output tokens from a swarm root's totals, all or nothing.
--
-- KEYS[1] totals hash  <prefix>:swarm:{<root id>}  (fields: spawned, budget_left)
-- ARGV[1] sub-agents  ARGV[2] max total  ARGV[3] tokens  ARGV[4] tree budget (-1: none)
-- ARGV[5] ttl (s)
--
-- Returns {1, 0} drawn; {0, spawned} over the total; {-1, budget left} over the budget
local spawned = tonumber(redis.call('HGET', KEYS[1], 'spawned') or '0')
if spawned + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return {0, spawned}
end
local budget = tonumber(ARGV[4])
if budget >= 0 then
  local left = tonumber(redis.call('HGET', KEYS[1], 'budget_left') or ARGV[4])
  if tonumber(ARGV[3]) > left then
    return {-1, left}
  end
  redis.call('HSET', KEYS[1], 'budget_left', left - tonumber(ARGV[3]))
end
redis.call('HINCRBY', KEYS[1], 'spawned', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, 0}
