-- Drop expired presence entries, then return the live ones.
-- KEYS[1] hash client id -> encoded info    KEYS[2] zset client id -> expiry (unix ms)
-- ARGV[1] "all" for {client id, info, ...}, "values" for {info, ...}
local data, expiry = KEYS[1], KEYS[2]
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))

local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', expiry, '-inf', now)
  -- HDEL in chunks: unpack() of a huge table overflows the Lua stack.
  for i = 1, #expired, 1000 do
    redis.call('HDEL', data, unpack(expired, i, math.min(i + 999, #expired)))
  end
end

if ARGV[1] == 'values' then
  return redis.call('HVALS', data)
end
return redis.call('HGETALL', data)
