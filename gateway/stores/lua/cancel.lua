-- cancel: withdraw a ticket whose delivery is gone: drop it from the waitlist, or release its lease if it
-- was admitted meanwhile.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: ticket, caller owner, pickup_ms
-- Returns {was_admitted (1/0), recheck ms or -1 (see release.lua), handoff ticket, owner, ...}.
local out = {0, -1}
if drop_ticket(ARGV[1]) == 0 then out[1] = drop_lease(ARGV[1]) end
unmark(ARGV[1]) -- its waitlist entry, or its pickup mark
admit_next(ARGV[2], tonumber(ARGV[3]), out)
return out
