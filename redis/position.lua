-- pushgate: a topic's current position, creating its epoch if it has none yet.
-- KEYS[1] <prefix>{<topic>}:m, KEYS[2] <prefix>{<topic>}:s; ARGV[1] history age in seconds.
-- Returns {epoch, offset}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local now = redis.call('TIME')
  epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) or 300)
end
return {epoch, redis.call('HGET', KEYS[1], 'offset')}
