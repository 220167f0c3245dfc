-- pushgate: a topic's current position, starting a new epoch if it has none yet or if its
-- history may have been lost (see publish.lua: the meta hash was written by another Redis
-- process, i.e. Redis restarted or failed over since; or the node that asks has already seen
-- a later offset of this very epoch).
-- KEYS[1] <prefix>{<topic>}:m, KEYS[2] <prefix>{<topic>}:s (renamed to <prefix>{<topic>}:o when
-- a new epoch starts, as in publish.lua); ARGV[1] history age in seconds;
-- ARGV[2], ARGV[3] (optional): the epoch and offset the asking node last saw for the topic.
-- Returns {epoch, offset}.
local info = redis.call('INFO', 'server')
local at = string.find(info, 'run_id:', 1, true)
local run = string.sub(info, at + 7, at + 46)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'run', 'offset')
local epoch = meta[1]
local behind = epoch and ARGV[2] == epoch and tonumber(meta[3]) < (tonumber(ARGV[3]) or 0)
if not epoch or meta[2] ~= run or behind then
  local now = redis.call('TIME')
  epoch = string.format('%x%05x', tonumber(now[1]), tonumber(now[2]))
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0, 'run', run)
  -- The old epoch's stream is kept beside the new one (`<prefix>{<topic>}:o`, meta field
  -- `prev`) until it expires: a node that had not yet received its last messages when Redis
  -- went away delivers them from there before moving on (they were acknowledged and survived).
  local old = string.sub(KEYS[2], 1, -2) .. 'o'
  if meta[1] and redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('RENAME', KEYS[2], old)
    redis.call('HSET', KEYS[1], 'prev', meta[1])
    redis.call('EXPIRE', old, tonumber(ARGV[1]) or 300)
  else
    redis.call('DEL', old)
    redis.call('HDEL', KEYS[1], 'prev')
  end
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]) or 300)
end
return {epoch, redis.call('HGET', KEYS[1], 'offset')}
