-- release: free a lease and admit the next waiters in the same step.
-- KEYS: the five keys of one flow key (lib.lua)
-- ARGV: lease, caller owner, pickup_ms
-- Returns {found (1/0), handoff ticket, owner, ...}. Releasing twice is harmless (found = 0).
local now = now_ms()
local pol = policy()
local out = {redis.call('ZREM', L, ARGV[1])}
trim(pol, now)
pump(pol, now, ARGV[2], tonumber(ARGV[3]), out)
touch(pol, now)
return out
