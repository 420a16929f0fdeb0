-- Publishes a follow-up once: KEYS[1] = the reply stream, KEYS[2] = its marker (same slot);
-- ARGV = marker TTL secs, MAXLEN (0: none), stream TTL secs (0: none), then field/value items.
-- Returns 1 when it published, 0 when the marker says it was published before, -1 (and does
-- nothing) when the stream's key holds another type.
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'stream' and t ~= 'none' then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local args = {KEYS[1]}
local maxlen = tonumber(ARGV[2])
if maxlen > 0 then
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = maxlen
end
args[#args + 1] = '*'
for i = 4, #ARGV do args[#args + 1] = ARGV[i] end
redis.call('XADD', unpack(args))
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
-- Set last: a failed XADD leaves no marker, and the follow-up is published on the next try.
redis.call('SET', KEYS[2], '1', 'EX', ARGV[1])
return 1
