local out = {}
local mine = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)[1]
  if not p then
    out[#out + 1] = 1
  elseif p[2] ~= ARGV[2] then
    out[#out + 1] = 2
  else
    out[#out + 1] = 0
    mine[#mine + 1] = ARGV[i]
  end
end
if #mine > 5 then
  mine[#mine + 1] = 'JUSTID'
  redis.call(unpack(mine))
end
return out
