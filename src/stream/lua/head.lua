local function pending(id)
  return redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1] ~= nil
end
local healed = 0
local trimmed = 0
local verdict = 'wait'
local sweep = ARGV[2] == ''
local function heal(head, hid)
  redis.call('ZREM', KEYS[2], head)
  redis.call('ZREM', KEYS[5], head)
  redis.call('HDEL', KEYS[6], hid)
  healed = healed + 1
  local e = redis.call('XRANGE', KEYS[1], hid, hid)[1]
  local f, code, detail
  if e then
    f = e[2]
    -- A hostile entry's fields could exceed what one call may carry: keep its id only.
    if #f > 256 then f = {} end
    code = 'stream.orphaned'
    detail = 'the entry left the pending list unanswered (consumer deleted or group reset)'
  else
    -- Gone from the stream before it was answered: what the queue key knows of it.
    f = {}
    local who = string.sub(KEYS[2], #ARGV[7] + 1)
    local b, u = string.match(who, '^([^:]+):(.*)$')
    if b and u and string.sub(KEYS[2], 1, #ARGV[7]) == ARGV[7] then
      f = {'business_id', b, 'user_id', u}
    end
    code = 'stream.trimmed'
    detail = 'the entry was removed from the stream (MAXLEN, XTRIM or XDEL) before it was answered'
    trimmed = trimmed + 1
    redis.call('HINCRBY', KEYS[7], 'trimmed', 1)
    redis.call('HSET', KEYS[7], 'trimmed_last_at', ARGV[6], 'trimmed_last_id', hid)
  end
  for _, kv in ipairs({{'inbound_id', hid}, {'error_code', code}, {'error_detail', detail},
      {'deliveries', '0'}, {'failed_at', ARGV[6]}, {'log_id', ''}}) do
    f[#f + 1] = kv[1]
    f[#f + 1] = kv[2]
  end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', unpack(f))
end
for _ = 1, 100 do
  local head = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not sweep and head == ARGV[2] then
    -- Our own entry may have left the pending list (its consumer was deleted): an orphan too.
    if pending(ARGV[3]) then verdict = 'go' else heal(head, ARGV[3]) verdict = 'gone' end
    break
  end
  if sweep and not head then verdict = 'gone' break end
  if not sweep and ((not head) or head > ARGV[2]) then
    if not pending(ARGV[3]) then verdict = 'gone' break end
    redis.call('ZADD', KEYS[2], 0, ARGV[2])
    redis.call('ZADD', KEYS[5], 0, ARGV[2])
  else
    local hid = unpad(head)
    if pending(hid) then verdict = 'wait' break end
    heal(head, hid)
  end
end
if healed > 0 and verdict ~= 'go' then redis.call('PUBLISH', ARGV[4], KEYS[2]) end
-- A queue that is not empty stays indexed; one this check emptied leaves the index.
if (sweep or verdict == 'gone') and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SREM', KEYS[4], KEYS[2])
end
return {verdict, healed, trimmed}
