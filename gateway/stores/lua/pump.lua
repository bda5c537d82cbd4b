-- pump: reap expired leases and tickets, admit what may go now, report on the caller's tickets.
-- Run on the owner's timer (rate window reopens, a lease may expire) and as its slow safety re-check.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: caller owner, pickup_ms, lease_ttl_ms, ticket...
-- Returns {recheck ms or -1 (nothing waits or only an event can help), statuses, handoff ticket, owner, ...};
-- statuses has one letter per asked ticket: w waiting, a admitted, g gone. An admitted ticket is taken over
-- in the same step: its lease runs for lease_ttl_ms from now, and it is no longer marked as awaiting pickup.
local now = now_ms()
local pol = policy()
trim(pol, now)
local out = {-1, ''}
pump(pol, now, ARGV[1], tonumber(ARGV[2]), out)
if count_waiting() > 0 then out[1] = blocked_for(pol, now) end
local ttl = tonumber(ARGV[3])
local statuses = {}
local taken = false
for i = 4, #ARGV do
  if count_waiting() > 0 and redis.call('ZSCORE', W, ARGV[i]) then
    statuses[#statuses + 1] = 'w'
  elseif extend(ARGV[i], ttl, now) then
    statuses[#statuses + 1] = 'a'
    taken = true
  else
    statuses[#statuses + 1] = 'g'
  end
end
if taken then keep_leases(ttl, now) end
out[2] = table.concat(statuses)
return out
