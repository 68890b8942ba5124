-- Take dead letters out of a role's set, each exactly once: what a replay or a purge
-- does. A second take of the same id finds nothing, so a replay never enqueues twice.
--
-- KEYS[1] index   KEYS[2] entries   (one hash tag: the role)
-- ARGV: task ids
--
-- Returns the entries taken, in ARGV's order, false where there was none.
local taken = {}
for i, id in ipairs(ARGV) do
  local entry = redis.call('HGET', KEYS[2], id)
  if entry then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[1], id)
  end
  taken[i] = entry
end
return taken
