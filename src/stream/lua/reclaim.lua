local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if p[1] then n = p[1][4] end
    local key = queue_key(ARGV[6], e[2])
    local m = member(e[1])
    redis.call('ZADD', key, 0, m)
    -- Taken over after its first delivery: if it is its queue's head, that delivery may have
    -- started the pipeline, which counts no attempt in the hash; count it now.
    if n == 2 and redis.call('ZRANGE', key, 0, 0)[1] == m then
      redis.call('HINCRBY', KEYS[4], e[1], 1)
    end
    redis.call('SADD', KEYS[2], key)
    redis.call('ZADD', KEYS[3], 0, m)
    out[#out + 1] = {e[1], e[2], n, key}
  end
end
return {r[1], out, r[3] or {}}
