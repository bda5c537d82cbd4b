-- revoke: take back an admission made for another instance that is gone (its wake-up found no live owner),
-- unless that owner picked it up meanwhile; then admit the next waiters, as release does. The admission's
-- start stays in the rate window: a revoked admission makes the key serve less, never more.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: ticket, caller owner, pickup_ms
-- Returns {revoked (1/0), recheck ms or -1 (see release.lua), handoff ticket, owner, ...}.
local out = {0, -1}
if redis.call('HGET', T, ARGV[1]) == PICKUP then
  unmark(ARGV[1])
  out[1] = drop_lease(ARGV[1])
end
admit_next(ARGV[2], tonumber(ARGV[3]), out)
return out
