-- enter: admit a ticket now, queue it at the tail, or refuse it.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: ticket, owner, lease_ttl_ms, pickup_ms, par, rate, per_ms, max_waiting, max_wait_ms[, only_now]
-- Returns {status, a, b, new_key, handoff ticket, owner, ...}:
--   status 1 admitted; 2 queued (a = position, b = recheck ms or -1); 3 refused (a = reason, b = retry ms);
--   4 not admitted and left no trace (only_now = '1': admit at once or not at all, never queue or refuse).
-- Idempotent: re-sending the same ticket returns its current status and takes nothing twice.
-- The common case (nobody waits, a token is free) runs ZADD L; the first operation of a call on the key also
-- runs TIME, HMGET P, ZCARD W and ZCARD L (see K in lib.lua).
local ticket, owner = ARGV[1], ARGV[2]
local lease_ttl, pickup_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()

local pol = policy()
local v = pol.v
local new_key = v[1] and 0 or 1
if v[1] ~= ARGV[5] or v[2] ~= ARGV[6] or v[3] ~= ARGV[7] or v[4] ~= ARGV[8] or v[5] ~= ARGV[9] then
  redis.call('HSET', P, 'par', ARGV[5], 'rate', ARGV[6], 'per', ARGV[7], 'mw', ARGV[8], 'mwt', ARGV[9])
  v[1], v[2], v[3], v[4], v[5] = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
  load_policy(v)
end
trim_window(pol, now)

local waiting = count_waiting()
if waiting == 0 and blocked_for(pol, now) == 0 then
  start(pol, ticket, lease_ttl, now) -- false: a re-send of a ticket admitted before; admitted all the same
  return {1, 0, 0, new_key}
end
if redis.call('ZSCORE', L, ticket) then return {1, 0, 0, new_key} end -- admitted before (a re-send)
local out = {0, 0, 0, new_key}
if waiting > 0 then
  local rank = redis.call('ZRANK', W, ticket)
  if rank then return {2, rank + 1, blocked_for(pol, now), new_key} end
  pump(pol, now, owner, pickup_ms, out)
  waiting = count_waiting()
end
if waiting == 0 and blocked_for(pol, now) == 0 then
  start(pol, ticket, lease_ttl, now)
  out[1] = 1
elseif ARGV[10] == '1' then
  out[1] = 4
  keep_policy(pol, now)
elseif waiting >= pol.mw then
  local retry = blocked_for(pol, now)
  out[1], out[2], out[3] = 3, 'waitlist_full', retry > 0 and retry or 1000
  keep_policy(pol, now)
else
  local seq = redis.call('HINCRBY', P, 'seq', 1)
  redis.call('ZADD', W, seq, ticket)
  pol.nw = waiting + 1
  mark(ticket, owner .. ' ' .. (now + pol.mwt) .. ' ' .. lease_ttl)
  local keep = pol.mwt + math.max(pol.per, lease_ttl) + IDLE_MS
  redis.call('PEXPIRE', W, keep)
  redis.call('PEXPIRE', T, keep)
  if pol.paused or pol.pinned then redis.call('PERSIST', P) else expire_policy(pol, keep, now) end
  out[1], out[2], out[3] = 2, waiting + 1, blocked_for(pol, now)
end
return out
