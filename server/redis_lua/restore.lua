-- Start a stream at a durable position unless it already has offsets (like SETNX).
-- KEYS[1] stream meta hash      KEYS[2] history stream
-- ARGV[1] offset   ARGV[2] epoch   ARGV[3] meta ttl (ms)
-- Returns the current {offset, epoch}.
local meta, stream = KEYS[1], KEYS[2]

local top = tonumber(redis.call('HGET', meta, 'o') or '0')
if top == 0 then
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', ARGV[2], 'o', ARGV[1])
  redis.call('PEXPIRE', meta, ARGV[3])
  return {tonumber(ARGV[1]), ARGV[2]}
end
return {top, redis.call('HGET', meta, 'e')}
