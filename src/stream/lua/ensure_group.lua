local mark = redis.call('GET', KEYS[2])
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], mark or '0', 'MKSTREAM')
if type(r) == 'table' and r.err then
  if string.find(r.err, 'BUSYGROUP', 1, true) then return {0, ''} end
  return r
end
if not mark then return {1, ''} end
redis.call('HINCRBY', KEYS[3], 'group_recreated', 1)
redis.call('HSET', KEYS[3], 'group_recreated_at', ARGV[2], 'group_recreated_mark', mark)
return {1, mark}
