-- End a run: store its outcome unless one is stored already, forget the run count and
-- any cancel (it is answered now), release the lease if it is still ours. Returns the
-- stored outcome, which is a racing twin's when that twin recorded first.
--
-- KEYS[1] result   KEYS[2] lease   KEYS[3] attempts   KEYS[4] cancel  (one hash tag: the id)
-- ARGV[1] result json  ARGV[2] result ttl (s)  ARGV[3] lease token ("" when none is held)
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return redis.call('GET', KEYS[1])
