-- pushgate: removes a node's presence entries, all at once (the script runs atomically, so a
-- reaper that dies or loses Redis half way leaves either everything or nothing done, and no
-- write of the reaped node can land between reading its entries and removing them).
-- KEYS[1] the set of nodes with entries (<internal>presence:nodes), KEYS[2] the node's liveness
-- key (<internal>node:<id>), KEYS[3] its topic set (<internal>presence:node:<id>).
-- ARGV[1] the node id; ARGV[2] the topic prefix (a topic's presence hash is <prefix>{<topic>}:p);
-- ARGV[3] "dead" (another node's, reaped only if its liveness key is gone and it is still in
-- the node set, which it then leaves last) or "own" (this node putting its entries back).
-- Returns false when there was nothing to reap (alive again, or reaped by another node),
-- else one {topic, {stored entry, ...}} per topic where entries were removed.
local dead = ARGV[3] == 'dead'
if dead then
  if redis.call('EXISTS', KEYS[2]) == 1 then return false end
  if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then return false end
end
local out = {}
for _, topic in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local hash = ARGV[2] .. '{' .. topic .. '}:p'
  local all = redis.call('HGETALL', hash)
  local refs, values = {}, {}
  for i = 1, #all, 2 do
    local ok, v = pcall(cjson.decode, all[i + 1])
    if ok and type(v) == 'table' and v.node == ARGV[1] then
      refs[#refs + 1] = all[i]
      values[#values + 1] = all[i + 1]
    end
  end
  -- HDEL in slices: unpack() of thousands of arguments would overflow Lua's stack.
  for i = 1, #refs, 1000 do
    redis.call('HDEL', hash, unpack(refs, i, math.min(i + 999, #refs)))
  end
  if #values > 0 then
    out[#out + 1] = {topic, values}
  end
end
redis.call('DEL', KEYS[3])
if dead then
  redis.call('SREM', KEYS[1], ARGV[1])
end
return out
