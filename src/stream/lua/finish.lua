local nr, nd = tonumber(ARGV[8]), tonumber(ARGV[9])
if nr > 0 and ARGV[10] == '1' then
  -- A reply stream that is not a stream would fail the XADD after the XACK took effect.
  local t = redis.call('TYPE', KEYS[2])['ok']
  if t ~= 'stream' and t ~= 'none' then return -1 end
end
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if acked == 1 then
  if nd > 0 then
    local args = {'XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*'}
    for i = 13 + nr, 12 + nr + nd do args[#args + 1] = ARGV[i] end
    redis.call(unpack(args))
  end
  if nr > 0 then
    local args = {'XADD', KEYS[2]}
    if tonumber(ARGV[5]) > 0 then
      args[#args + 1] = 'MAXLEN'
      args[#args + 1] = '~'
      args[#args + 1] = ARGV[5]
    end
    args[#args + 1] = '*'
    for i = 13, 12 + nr do args[#args + 1] = ARGV[i] end
    redis.call(unpack(args))
    if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[6]) end
  end
end
-- A first delivery's start is not counted in the hash (see delivery.rs): nothing to delete.
if ARGV[12] == '1' then redis.call('HDEL', KEYS[4], ARGV[2]) end
-- Only the holder that acknowledged dequeues: an entry that left the pending list unanswered
-- (its consumer deleted) stays at its queue's head, where the head check or the sweep finds it
-- and dead-letters it as an orphan; one another holder finished was dequeued by that holder.
if KEYS[5] and acked == 1 then
  redis.call('ZREM', KEYS[7], ARGV[3])
  if redis.call('ZREM', KEYS[5], ARGV[3]) == 1 then
    local nxt = redis.call('ZRANGE', KEYS[5], 0, 0)[1]
    if nxt then
      if ARGV[11] ~= '1' then redis.call('PUBLISH', ARGV[4], nxt .. KEYS[5]) end
    else
      redis.call('SREM', KEYS[6], KEYS[5])
    end
  end
end
return acked
