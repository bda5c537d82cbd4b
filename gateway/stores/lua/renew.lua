-- renew: push the expiry of live leases to now + ttl.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: ttl_ms, lease...
-- Returns one 1/0 per lease (0: unknown or already expired).
local now = now_ms()
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', L, ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', L, 'XX', now + ttl, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if redis.call('PTTL', L) < ttl + IDLE_MS then
  redis.call('PEXPIRE', L, ttl + IDLE_MS)
  local pol = policy()
  if not (pol.paused or pol.pinned) then redis.call('PEXPIRE', P, ttl + IDLE_MS + pol.mwt) end
end
return out
