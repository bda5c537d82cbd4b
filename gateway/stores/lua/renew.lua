-- renew: push the expiry of live leases to now + ttl.
-- KEYS: the five keys of one flow key (lib.lua)
-- ARGV: ttl_ms, lease...
-- Returns one 1/0 per lease (0: unknown or already expired).
local now = now_ms()
local expires = now + tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local score = redis.call('ZSCORE', L, ARGV[i])
  if score and tonumber(score) > now then
    redis.call('ZADD', L, 'XX', expires, ARGV[i])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
touch(policy(), now)
return out
