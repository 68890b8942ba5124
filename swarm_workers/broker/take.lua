-- Take the next message for a consumer and record it as delivered, in one step: the
-- RPOP of kombu's BRPOP and the `unacked` record kombu writes only after the reply
-- has reached the worker (docs/reliability.md, finding 3). A worker or a connection
-- that dies after this script leaves the message in `unacked`, which the visibility
-- timeout brings back; it never leaves it nowhere.
--
-- KEYS[1] unacked (hash: delivery tag -> [message, exchange, routing key], as kombu's)
-- KEYS[2] unacked_index (sorted set: delivery tags by time delivered, as kombu's)
-- then for each queue, in the order to drain them: the queue, its bell, and the list
-- its undecodable messages go to (keys.py)
--
-- Returns {queue, message}   taken and recorded
--         {queue, false}     an undecodable message, moved to its list
--         false              every queue is empty
--
-- When a queue still holds messages after the take, its bell rings: a consumer asleep
-- on it wakes and takes too, so one producer's batch spreads over the idle workers.
for i = 3, #KEYS, 3 do
  local queue, bell, undecodable = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local payload = redis.call('LINDEX', queue, -1)
  if payload then
    local ok, message = pcall(cjson.decode, payload)
    local props = ok and type(message) == 'table' and message['properties']
    local info, tag
    if type(props) == 'table' then
      info, tag = props['delivery_info'], props['delivery_tag']
    end
    if type(info) ~= 'table' or type(tag) ~= 'string' then
      redis.call('LMOVE', queue, undecodable, 'RIGHT', 'LEFT')
      return {queue, false}
    end
    redis.call('RPOP', queue)
    local now = redis.call('TIME')
    redis.call('ZADD', KEYS[2], tonumber(now[1]) + tonumber(now[2]) / 1000000, tag)
    redis.call('HSET', KEYS[1], tag, '[' .. payload .. ',' .. cjson.encode(info['exchange'] or '')
      .. ',' .. cjson.encode(info['routing_key'] or '') .. ']')
    if redis.call('LLEN', queue) > 0 then
      redis.call('LPUSH', bell, 1)
      redis.call('LTRIM', bell, 0, 0)
    end
    return {queue, payload}
  end
end
return false
