-- Keep one dead letter, and the role's set within its retention and its cap.
--
-- KEYS[1] index (zset id -> died at, s)   KEYS[2] entries (hash id -> json)
-- KEYS[3] dropped (counter)               (one hash tag: the role)
-- ARGV[1] task id   ARGV[2] entry json   ARGV[3] died at (s)   ARGV[4] keep after (s)
-- ARGV[5] cap
--
-- Returns the number of letters dropped to stay within the cap.
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
for _, id in ipairs(expired) do
  redis.call('HDEL', KEYS[2], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[4])
local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[5])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, over - 1)
  for _, id in ipairs(oldest) do
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, over - 1)
  redis.call('INCRBY', KEYS[3], over)
  return over
end
return 0
