-- release: free a lease and admit the next waiters in the same step.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: lease, caller owner, pickup_ms
-- Returns {found (1/0), handoff ticket, owner, ...}. Releasing twice is harmless (found = 0).
local out = {redis.call('ZREM', L, ARGV[1])}
if redis.call('EXISTS', W) == 1 then
  local now = now_ms()
  local pol = policy()
  trim(pol, now)
  pump(pol, now, ARGV[2], tonumber(ARGV[3]), out)
end
return out
