-- Read a channel's stream position and (some of) its history in one step.
-- KEYS[1] stream meta hash      KEYS[2] history stream
-- ARGV[1] epoch to use if the stream is new   ARGV[2] meta ttl (ms)
-- ARGV[3] "1" if a since position is given    ARGV[4] since offset
-- ARGV[5] since epoch ("" = the stream's)      ARGV[6] limit (-1 = everything kept)
-- ARGV[7] "1" for newest first (with a since position: the entries before it)
-- Returns {top offset, epoch, {payload, ...}}.
local meta, stream = KEYS[1], KEYS[2]

local m = redis.call('HMGET', meta, 'e', 'o')
local epoch, top = m[1], tonumber(m[2] or '0')
if not epoch then
  -- Fix the epoch now, so a reader's position stays valid for the first publish.
  epoch = ARGV[1]
  top = 0
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch)
end
if redis.call('PTTL', meta) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', meta, ARGV[2])
end

local limit = tonumber(ARGV[6])
local since = ARGV[3] == '1'
local reverse = ARGV[7] == '1'
if limit == 0 or (since and ARGV[5] ~= '' and ARGV[5] ~= epoch)
    or (since and reverse and tonumber(ARGV[4]) == 0) then
  return {top, epoch, {}}
end

local entries
if reverse then
  local high = '+'
  if since then
    high = '(' .. ARGV[4] .. '-0'
  end
  if limit > 0 then
    entries = redis.call('XREVRANGE', stream, high, '-', 'COUNT', limit)
  else
    entries = redis.call('XREVRANGE', stream, high, '-')
  end
else
  local low = '-'
  if since then
    low = '(' .. ARGV[4] .. '-0'
  end
  if limit > 0 then
    entries = redis.call('XRANGE', stream, low, '+', 'COUNT', limit)
  else
    entries = redis.call('XRANGE', stream, low, '+')
  end
end

local out = {}
for i, entry in ipairs(entries) do
  out[i] = entry[2][2]
end
return {top, epoch, out}
