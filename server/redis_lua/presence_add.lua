-- Add or refresh one presence entry; expiry times come from the Redis clock.
-- KEYS[1] hash client id -> encoded info    KEYS[2] zset client id -> expiry (unix ms)
-- ARGV[1] client id   ARGV[2] encoded info   ARGV[3] ttl (ms)
local data, expiry = KEYS[1], KEYS[2]
local ttl = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

redis.call('ZADD', expiry, string.format('%d', now + ttl), ARGV[1])
redis.call('HSET', data, ARGV[1], ARGV[2])
-- Both keys live at least as long as their longest-lived entry.
for _, key in ipairs({data, expiry}) do
  if redis.call('PTTL', key) < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
return 0
