local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then return 0 end
local floor = ARGV[1]
local queued = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
if queued then
  local oldest = unpad(queued)
  if older(oldest, floor) then floor = oldest end
end
for _, g in ipairs(groups) do
  local name, last, pending
  for i = 1, #g, 2 do
    if g[i] == 'name' then name = g[i + 1]
    elseif g[i] == 'last-delivered-id' then last = g[i + 1]
    elseif g[i] == 'pending' then pending = g[i + 1] end
  end
  if older(last, floor) then floor = last end
  if pending > 0 then
    local oldest = redis.call('XPENDING', KEYS[1], name)[2]
    if oldest and older(oldest, floor) then floor = oldest end
  end
end
return redis.call('XTRIM', KEYS[1], 'MINID', floor)
