-- Start one delivery of a task, atomically: look for its stored result and for a
-- cancel, take its lease, count the run. One round trip, and no gap between "no result
-- yet" and "lease taken" in which a finishing twin could record its outcome unseen.
--
-- KEYS[1] result   KEYS[2] lease   KEYS[3] attempts   KEYS[4] cancel
-- KEYS[5] checkpoint                                   (one hash tag: the id)
-- ARGV[1] lease token  ARGV[2] lease ttl (ms)  ARGV[3] attempts ttl (s)
--
-- Returns {"done", <result json>}   an outcome is stored: return it, run nothing
--         {"cancelled", 0}          cancelled before it ran: record that, run nothing
--         {"busy", <lease pttl ms>} another delivery holds the lease: wait for it
--         {"run", <runs started>, <1 if a checkpoint exists else 0>}
--                                   the lease is ours; this run is counted
local stored = redis.call('GET', KEYS[1])
if stored then
  return {'done', stored}
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  return {'cancelled', 0}
end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'busy', redis.call('PTTL', KEYS[2])}
end
local runs = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
return {'run', runs, redis.call('EXISTS', KEYS[5])}
