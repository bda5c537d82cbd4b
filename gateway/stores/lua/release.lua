-- release: free a lease and admit the next waiters in the same step.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: lease, caller owner, pickup_ms
-- Returns {found (1/0), recheck ms or -1, handoff ticket, owner, ...}: recheck is when the store should be
-- pumped again because waiters remain that only time (rate window, lease expiry) will let go.
-- Releasing twice is harmless (found = 0).
local out = {drop_lease(ARGV[1]), -1}
unmark(ARGV[1]) -- its pickup mark, if its owner never picked it up
admit_next(ARGV[2], tonumber(ARGV[3]), out)
return out
