-- Renew, release or abandon a run's lease, only while the caller still holds it.
--
-- KEYS[1] lease   KEYS[2] attempts   KEYS[3] cancel  (one hash tag: the task id)
-- ARGV[1] "renew" | "release" | "abandon"   ARGV[2] lease token   ARGV[3] ttl (ms, renew)
--
-- renew:   extend the lease          -> 1, 2 when the task was cancelled meanwhile,
--                                       0 when the lease is not ours
-- release: drop the lease            -> 1, or 0 when it is not ours
-- abandon: drop the lease and un-count the run (it stopped for a Redis or broker fault,
--          not because its worker died)   -> 1, or 0 when it is not ours
if redis.call('GET', KEYS[1]) ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  if redis.call('EXISTS', KEYS[3]) == 1 then
    return 2
  end
  return 1
end
redis.call('DEL', KEYS[1])
if ARGV[1] == 'abandon' and redis.call('DECR', KEYS[2]) <= 0 then
  redis.call('DEL', KEYS[2])
end
return 1
