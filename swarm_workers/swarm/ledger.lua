-- A supervisor's spawn ledger: one hash under its task id's tag.
--
-- KEYS[1] ledger hash  <prefix>:spawn:{<supervisor id>}
--
-- ARGV[1] "round": ARGV[2] call id  ARGV[3] dag id  ARGV[4] record json  ARGV[5] ttl (s)
--   ARGV[6..] child ids
--   The round this spawn call opened; the same round when the call is known already (a
--   resumed run repeats the call): fields call:<id>, dag:<dag id>, round:<r>, left:<r>,
--   w:<r>:<child>, and waiting (the open round: the supervisor's state reads `waiting`
--   until its last child records).
--   -> round number
-- ARGV[1] "done": ARGV[2] round  ARGV[3] child id
--   A child recorded its outcome (idempotent: a redelivered child counts once).
--   -> {first, last}: first 1 when this child was counted now; last 1 when no child of
--      the round is left and its continuation was not sent yet (the caller sends it,
--      then marks `cont:<r>`; a crash in between sends it again, never lost)
if ARGV[1] == 'round' then
  local known = redis.call('HGET', KEYS[1], 'call:' .. ARGV[2])
  if known then
    return tonumber(known)
  end
  local r = redis.call('HINCRBY', KEYS[1], 'rounds', 1)
  redis.call('HSET', KEYS[1], 'call:' .. ARGV[2], r, 'dag:' .. ARGV[3], r,
             'round:' .. r, ARGV[4], 'left:' .. r, #ARGV - 5, 'waiting', r)
  for i = 6, #ARGV do
    redis.call('HSET', KEYS[1], 'w:' .. r .. ':' .. ARGV[i], 1)
  end
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return r
end
local r = ARGV[2]
local first = 0
if redis.call('HDEL', KEYS[1], 'w:' .. r .. ':' .. ARGV[3]) == 1 then
  first = 1
  redis.call('HINCRBY', KEYS[1], 'left:' .. r, -1)
end
local left = tonumber(redis.call('HGET', KEYS[1], 'left:' .. r) or '-1')
if left == 0 and redis.call('HGET', KEYS[1], 'waiting') == r then
  redis.call('HDEL', KEYS[1], 'waiting')
end
if left == 0 and redis.call('HEXISTS', KEYS[1], 'cont:' .. r) == 0 then
  return {first, 1}
end
return {first, 0}
