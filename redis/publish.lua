-- pushgate: publish one message with history, atomically.
--
-- KEYS[1]  <prefix>{<topic>}:m   the topic's meta hash (epoch, offset)
-- KEYS[2]  <prefix>{<topic>}:s   the topic's history stream (entry id = "<offset>-0"); when a
--                                 new epoch starts it becomes <prefix>{<topic>}:o (the name is
--                                 KEYS[2] with its last letter changed: same hash slot)
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
-- The epoch changes whenever the topic's history may have been lost, so a position is never
-- reused for other content:
-- - the meta hash is gone (expired, flushed, Redis restarted without persistence);
-- - the meta hash was written by another Redis process than the one running this script
--   (field `run`, the `run_id` of INFO): Redis restarted (from an RDB snapshot or an AOF that
--   may lack the last acknowledged writes, or a restored backup), or a failover promoted a
--   replica (which may not have received the last writes). Redis cannot tell from inside a
--   script whether a restart lost anything, so every restart and failover starts a new epoch;
--   clients that come back with an older position are answered `recovered: false`.
local ok = pcall(cjson.decode, ARGV[3])
if not ok then
  return redis.error_reply('ERR pushgate: payload is not valid JSON')
end
local size = tonumber(ARGV[4]) or 1000
local ttl = tonumber(ARGV[5]) or 300
local now = redis.call('TIME')
local info = redis.call('INFO', 'server')
local at = string.find(info, 'run_id:', 1, true)
local run = string.sub(info, at + 7, at + 46)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'run')
local epoch = meta[1]
if not epoch or meta[2] ~= run then
  epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
  -- The old epoch's stream is kept beside the new one (`<prefix>{<topic>}:o`, meta field
  -- `prev`) until it expires: a node that had not yet received its last messages when Redis
  -- went away delivers them from there before moving on (they were acknowledged and survived).
  local old = string.sub(KEYS[2], 1, -2) .. 'o'
  if meta[1] and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], old)
    redis.call('HSET', KEYS[1], 'prev', meta[1])
    redis.call('EXPIRE', old, tonumber(ARGV[5]) or 300)
  else
    redis.call('DEL', old)
    redis.call('HDEL', KEYS[1], 'prev')
  end
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
