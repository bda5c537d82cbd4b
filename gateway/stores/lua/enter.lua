-- enter: admit a ticket now, queue it at the tail, or refuse it.
-- KEYS: the five keys of one flow key (lib.lua)
-- ARGV: ticket, owner, lease_ttl_ms, pickup_ms, par, rate, per_ms, max_waiting, max_wait_ms
-- Returns {status, a, b, new_key, handoff ticket, owner, ...}:
--   status 1 admitted; 2 queued (a = position, b = recheck ms or -1); 3 refused (a = reason, b = retry ms).
-- Idempotent: re-sending the same ticket returns its current status and takes nothing twice.
local ticket, owner = ARGV[1], ARGV[2]
local lease_ttl, pickup_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()

local new_key = redis.call('EXISTS', P) == 0 and 1 or 0
local req = redis.call('HMGET', P, 'par', 'rate', 'per', 'mw', 'mwt')
local changed = false
for i = 1, 5 do
  if req[i] ~= ARGV[4 + i] then changed = true end
end
if changed then
  redis.call('HSET', P, 'par', ARGV[5], 'rate', ARGV[6], 'per', ARGV[7], 'mw', ARGV[8], 'mwt', ARGV[9])
end

local pol = policy()
trim(pol, now)
if redis.call('ZSCORE', L, ticket) then return {1, 0, 0, new_key} end
if redis.call('ZSCORE', W, ticket) then
  return {2, redis.call('ZRANK', W, ticket) + 1, blocked_for(pol, now), new_key}
end

local out = {0, 0, 0, new_key}
if redis.call('ZCARD', W) > 0 then pump(pol, now, owner, pickup_ms, out) end
if redis.call('ZCARD', W) == 0 and blocked_for(pol, now) == 0 then
  start(pol, ticket, lease_ttl, now)
  out[1] = 1
else
  local waiting = redis.call('ZCARD', W)
  if waiting >= pol.mw then
    local retry = blocked_for(pol, now)
    out[1], out[2], out[3] = 3, 'waitlist_full', retry > 0 and retry or 1000
  else
    local seq = redis.call('HINCRBY', P, 'seq', 1)
    redis.call('ZADD', W, seq, ticket)
    redis.call('HSET', T, ticket, owner .. ' ' .. (now + pol.mwt) .. ' ' .. lease_ttl)
    out[1], out[2], out[3] = 2, waiting + 1, blocked_for(pol, now)
  end
end
touch(pol, now)
return out
