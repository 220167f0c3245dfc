-- pushgate: publish one message with history, atomically.
--
-- KEYS[1]  <prefix>{<topic>}:m   the topic's meta hash (epoch, offset)
-- KEYS[2]  <prefix>{<topic>}:s   the topic's history stream (entry id = "<offset>-0")
-- ARGV[1]  <prefix><topic>       the topic's pub/sub channel (nodes with subscribers to it
--                                 listen there; their own channels and keys live under
--                                 redis.internal_prefix, which no topic can reach: README,
--                                 "Redis keys and channels")
-- ARGV[2]  event name
-- ARGV[3]  payload, as JSON text
-- ARGV[4]  history size (messages kept; default 1000)
-- ARGV[5]  history age in seconds (keys expire this long after the last publish; default 300)
-- ARGV[6]  optional: a sender id ("<node>.<connection>", a forwarded push's "sender") whose
--          connection must not get the message ("send to others"); empty or absent for none
-- Returns the message's position "<epoch>:<offset>".
--
-- The epoch changes whenever the topic's history is lost or recreated (the meta hash expired
-- or Redis restarted without persistence), so an old position is never taken for a new one.
local ok = pcall(cjson.decode, ARGV[3])
if not ok then
  return redis.error_reply('ERR pushgate: payload is not valid JSON')
end
local size = tonumber(ARGV[4]) or 1000
local ttl = tonumber(ARGV[5]) or 300
local now = redis.call('TIME')
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('DEL', KEYS[2])
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
local position = epoch .. ':' .. offset
local exclude = ''
if ARGV[6] and ARGV[6] ~= '' then
  exclude = ',"exclude":' .. cjson.encode(ARGV[6])
end
local message = '{"position":"' .. position .. '","event":' .. cjson.encode(ARGV[2]) ..
  ',"payload":' .. ARGV[3] .. exclude .. '}'
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'm', message, 't', ms)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('PUBLISH', ARGV[1], message)
return position
