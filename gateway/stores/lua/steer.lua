-- steer: an operator's change to one key: set_policy, pause, resume, pin, unpin or reset_rate. Then admit
-- what the change lets go.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: caller owner, pickup_ms, operation, operation arguments...
--   set_policy par rate per mw mwt | pause | resume | pin par rate per ('' = leave) | unpin par rate (1/0)
--   | reset_rate
-- Returns {recheck ms or -1 (see release.lua), handoff ticket, owner, ...}.
local op = ARGV[3]
local now = now_ms()
if op == 'set_policy' then
  redis.call('HSET', P, 'par', ARGV[4], 'rate', ARGV[5], 'per', ARGV[6], 'mw', ARGV[7], 'mwt', ARGV[8])
elseif op == 'pause' then
  redis.call('HSET', P, 'paused', '1')
elseif op == 'resume' then
  redis.call('HDEL', P, 'paused')
elseif op == 'pin' then
  if ARGV[4] ~= '' then redis.call('HSET', P, 'ppar', ARGV[4]) end
  if ARGV[5] ~= '' then redis.call('HSET', P, 'prate', ARGV[5], 'pper', ARGV[6]) end
elseif op == 'unpin' then
  if ARGV[4] == '1' then redis.call('HDEL', P, 'ppar') end
  if ARGV[5] == '1' then redis.call('HDEL', P, 'prate', 'pper') end
elseif op == 'reset_rate' then
  redis.call('DEL', S)
  redis.call('HSET', P, 'reset', now)
else
  return redis.error_reply('unknown steer operation ' .. op)
end
local pol = policy()
trim(pol, now)
local out = {-1}
pump(pol, now, ARGV[1], tonumber(ARGV[2]), out)
if redis.call('EXISTS', W) == 1 then out[1] = blocked_for(pol, now) end
keep_policy(pol, now)
return out
