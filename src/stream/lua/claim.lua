local res = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
local out = {}
local queued = {'ZADD', KEYS[3]}
if res then
  for _, e in ipairs(res[1][2]) do
    local key = queue_key(ARGV[4], e[2])
    local m = member(e[1])
    redis.call('ZADD', key, 0, m)
    local at_head = 0
    if redis.call('ZRANGE', key, 0, 0)[1] == m then
      at_head = 1
      redis.call('SADD', KEYS[2], key)
    end
    queued[#queued + 1] = 0
    queued[#queued + 1] = m
    out[#out + 1] = {e[1], e[2], 1, key, at_head}
  end
end
if #queued > 2 then redis.call(unpack(queued)) end
-- The last id the group delivered: where it is recreated should it disappear.
if #out > 0 then redis.call('SET', KEYS[4], out[#out][1]) end
return {last_id, out}
