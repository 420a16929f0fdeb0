-- KEYS[1] = inbound, KEYS[2] = this group's queued entries; ARGV[1] = group, ARGV[2] = entry id.
-- Removes the entry from the stream unless a worker may still need it: returns 'undelivered'
-- (the group never delivered it: removed, so no worker will), 'settled' (delivered and
-- finished, or never to be delivered: removed), 'in_flight' (pending or still in its order
-- queue: left alone), or 'absent' (not in the stream).
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then return 'absent' end
local last
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local name, delivered
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1]
      elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
    end
    if name == ARGV[1] then last = delivered end
  end
end
-- Queued: a worker holds it or will (also while the group is missing, recreated at its mark).
if redis.call('ZSCORE', KEYS[2], member(ARGV[2])) then return 'in_flight' end
if last and not older(last, ARGV[2]) then
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) > 0 then return 'in_flight' end
  redis.call('XDEL', KEYS[1], ARGV[2])
  return 'settled'
end
redis.call('XDEL', KEYS[1], ARGV[2])
if last then return 'undelivered' end
return 'settled'
