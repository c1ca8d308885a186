-- Assign the next stream position, append to history and fan out, atomically.
-- KEYS[1] stream meta hash (e = epoch, o = top offset)
-- KEYS[2] history stream (entry id "<offset>-0", field d = payload)
-- KEYS[3] idempotency hash (o, e), only when the publish carries a key
-- ARGV[1] pub/sub channel      ARGV[2] body (meta JSON, "\n", data)
-- ARGV[3] history size         ARGV[4] history ttl (ms)
-- ARGV[5] meta ttl (ms)        ARGV[6] epoch to use if the stream is new
-- ARGV[7] idempotency ttl (ms)
-- ARGV[8] "1": the stream must have offsets already (else nothing happens)
-- Returns {offset, epoch}; {-1, ""} when ARGV[8] is "1" and the stream has no offsets.
local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]

if idem then
  local seen = redis.call('HMGET', idem, 'o', 'e')
  if seen[1] then
    return {tonumber(seen[1]), seen[2]}
  end
end

local offset, epoch = 0, ''
local size = tonumber(ARGV[3])
if size > 0 then
  if ARGV[8] == '1' and not redis.call('HGET', meta, 'o') then
    return {-1, ''}
  end
  epoch = redis.call('HGET', meta, 'e')
  if not epoch then
    -- The stream was lost (or never existed): a new epoch, and no stale items.
    epoch = ARGV[6]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'e', epoch)
  end
  offset = redis.call('HINCRBY', meta, 'o', 1)
  redis.call('PEXPIRE', meta, ARGV[5])
  local payload = 'p' .. offset .. ' ' .. #epoch .. ' ' .. epoch .. ARGV[2]
  redis.call('XADD', stream, 'MAXLEN', size, offset .. '-0', 'd', payload)
  redis.call('PEXPIRE', stream, ARGV[4])
  redis.call('PUBLISH', ARGV[1], payload)
else
  redis.call('PUBLISH', ARGV[1], 'p0 0 ' .. ARGV[2])
end

if idem then
  redis.call('HSET', idem, 'o', offset, 'e', epoch)
  redis.call('PEXPIRE', idem, ARGV[7])
end
return {offset, epoch}
