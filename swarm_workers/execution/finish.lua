-- End a run: store its outcome unless one is stored already, forget the run count and
-- any cancel (it is answered now), release the lease if it is still ours. Returns the
-- stored outcome, which is a racing twin's when that twin recorded first.
--
-- KEYS[1] result   KEYS[2] lease   KEYS[3] attempts   KEYS[4] cancel  (one hash tag: the id)
-- KEYS[5..] the run's own state, gone once it records: its checkpoint and their blobs,
--           a supervisor's spawn ledger and a root's swarm totals (`Keys.run_state_keys`)
-- ARGV[1] result json  ARGV[2] result ttl (s)  ARGV[3] lease token ("" when none is held)
redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
redis.call('DEL', KEYS[3], KEYS[4])
for i = 5, #KEYS do
  redis.call('DEL', KEYS[i])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return redis.call('GET', KEYS[1])
