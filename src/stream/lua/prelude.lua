-- Shared by every script (stream/mod.rs `script!`): entry ids and queue members, and the
-- canonical business and user ids exactly as `protocol::inbound::canonical_business` /
-- `canonical_user` compute them for every id they accept (the scripts accept a superset:
-- what Rust then rejects is answered with an error and finished through the key the script
-- reported).
local function trim(s)
  -- Linear: find the first and the last byte that is not ASCII whitespace (a pattern anchored
  -- at the end backtracks over every run of spaces).
  local first = string.find(s, '[^ \t\n\f\r]')
  if not first then return '' end
  local last = #s
  while true do
    local b = string.byte(s, last)
    if b ~= 32 and b ~= 9 and b ~= 10 and b ~= 12 and b ~= 13 then break end
    last = last - 1
  end
  return string.sub(s, first, last)
end
local function canon_business(s)
  s = string.lower(trim(s))
  if #s > 64 then return nil end
  if string.sub(s, 1, 9) == 'urn:uuid:' then s = string.sub(s, 10) end
  if string.sub(s, 1, 1) == '{' and string.sub(s, -1) == '}' then s = string.sub(s, 2, -2) end
  local h
  if #s == 36 and string.match(s, '^%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$') then
    h = string.gsub(s, '%-', '')
  elseif #s == 32 and string.match(s, '^%x+$') then
    h = s
  else
    return nil
  end
  return string.sub(h, 1, 8) .. '-' .. string.sub(h, 9, 12) .. '-' .. string.sub(h, 13, 16)
    .. '-' .. string.sub(h, 17, 20) .. '-' .. string.sub(h, 21, 32)
end
local function queue_key(prefix, fields)
  local b, u
  for i = 1, #fields, 2 do
    if fields[i] == 'business_id' then b = fields[i + 1]
    elseif fields[i] == 'user_id' then u = fields[i + 1] end
  end
  -- Entries without a usable business and user (invalid: answered at once) share one queue,
  -- so that they too are tracked until finished (see order.rs).
  local other = prefix .. '-'
  if not b or not u then return other end
  b = canon_business(b)
  u = trim(u)
  if not b or #u == 0 then return other end
  return prefix .. b .. ':' .. u
end
-- Entry ids. A queue member is an entry id with both parts padded to 20 digits, so that
-- members sort as their ids do (order.rs `member` computes the same).
local function member(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #seq) .. seq
end
-- The entry id of a queue member.
local function unpad(m)
  local ms, seq = string.match(m, '^0*(%d-)-0*(%d-)$')
  if ms == '' then ms = '0' end
  if seq == '' then seq = '0' end
  return ms .. '-' .. seq
end
-- Whether entry id `a` comes before entry id `b`.
local function older(a, b)
  return member(a) < member(b)
end
