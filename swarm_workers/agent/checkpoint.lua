-- Save an agent loop's checkpoint, only while the run saving it holds the task's lease
-- (a run that lost its lease must not overwrite what its successor resumes from).
--
-- KEYS[1] lease   KEYS[2] checkpoint   KEYS[3] blobs        (one hash tag: the task id)
-- ARGV[1] lease token ("": no fence, e.g. tests)   ARGV[2] ttl (s)   ARGV[3] checkpoint json
-- ARGV[4], ARGV[5], ...  sha256, text of each large tool output not stored yet
--
-- Returns 1 saved, 0 the lease is not ours (nothing written)
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
for i = 4, #ARGV, 2 do
  redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1])
end
redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return 1
