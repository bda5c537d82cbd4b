-- cancel: withdraw a ticket whose delivery is gone: drop it from the waitlist, or release its lease if it
-- was admitted meanwhile.
-- KEYS: the five keys of one flow key (lib.lua)
-- ARGV: ticket, caller owner, pickup_ms
-- Returns {was_admitted (1/0), handoff ticket, owner, ...}.
local now = now_ms()
local pol = policy()
local out = {0}
if redis.call('ZREM', W, ARGV[1]) == 1 then
  redis.call('HDEL', T, ARGV[1])
else
  out[1] = redis.call('ZREM', L, ARGV[1])
end
trim(pol, now)
pump(pol, now, ARGV[2], tonumber(ARGV[3]), out)
touch(pol, now)
return out
