-- Remove one presence entry from both keys.
-- KEYS[1] hash client id -> encoded info    KEYS[2] zset client id -> expiry
-- ARGV[1] client id
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 0
