-- renew: push the expiry of live leases to now + ttl (an admission awaiting pickup is thereby picked up).
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: ttl_ms, lease...
-- Returns one 1/0 per lease (0: unknown or already expired).
local now = now_ms()
local ttl = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = extend(ARGV[i], ttl, now) and 1 or 0
end
keep_leases(ttl, now)
return out
