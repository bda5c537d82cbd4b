-- Shared helpers, compiled in front of every operation (see scripts.py). An operation works on the five
-- keys of one flow key, all under one hash tag {K} so they live in one slot:
--   P fc:{K}:p  hash   policy: par rate per mw mwt (requested), ppar prate pper (pins), paused, seq, reset,
--                      kept (the TTLs of P, L and S reach at least this far: starts before it set none)
--   L fc:{K}:l  zset   lease id -> expires at (ms)
--   S fc:{K}:s  zset   start id -> started at (ms): the sliding window of starts
--   W fc:{K}:w  zset   ticket id -> arrival sequence (FIFO waitlist)
--   T fc:{K}:t  hash   ticket id -> "owner deadline_ms lease_ttl_ms" while it waits; PICKUP once admitted for
--                      another instance, until that owner picks the lease up (renews it) or it goes
-- Numbers: -1 means unlimited. Time comes from the server only.
--
-- K is what this script call has learnt of the bound key: its policy (policy()) and, once counted, how many
-- entries L, S, W and T hold (nl, ns, nw, nt). A script runs alone on the server, so the counts stay exact for
-- the whole call as long as every change below adjusts them; then the operations of a batch on one key read the
-- policy and count each set once, not once per operation.
local P, L, S, W, T, K
local views = {}
local IDLE_MS = 120000 -- state outlives its last use by this much (plus the longest period, lease or wait)
local PICKUP = 'pickup' -- T's mark of an admission its owner (another instance) has not picked up yet

local function bind(keys, base)
  P, L, S, W, T = keys[base + 1], keys[base + 2], keys[base + 3], keys[base + 4], keys[base + 5]
  K = views[P]
  if not K then
    K = {}
    views[P] = K
  end
end

local clock -- one reading per script call: the operations of a batch share it
local function now_ms()
  if not clock then
    local t = redis.call('TIME')
    clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock
end

-- A time as the string Redis gets: formatting a number is slow, and the operations of a call share the clock
-- (and mostly their lease TTLs), so each time is formatted once per call.
local stamps = {}
local function stamp(ms)
  local text = stamps[ms]
  if not text then
    text = tostring(ms)
    stamps[ms] = text
  end
  return text
end

local function num(value, default)
  if not value or value == '' then return default end
  return tonumber(value)
end

local POLICY_FIELDS = {'par', 'rate', 'per', 'mw', 'mwt', 'ppar', 'prate', 'pper', 'paused', 'kept'}

-- Set K's effective policy from v (HMGET P POLICY_FIELDS): the requested values with the operator's pins on top.
local function load_policy(v)
  K.v = v
  K.par, K.rate, K.per, K.mw = num(v[1], -1), num(v[2], -1), num(v[3], 1000), num(v[4], 10000)
  K.mwt, K.paused, K.pinned, K.kept = num(v[5], 30000), v[9] == '1', false, num(v[10], 0)
  if v[6] then K.par = tonumber(v[6]); K.pinned = true end
  if v[7] then K.rate = tonumber(v[7]); K.per = num(v[8], K.per); K.pinned = true end
  K.window_trimmed = nil -- a new period may cut the window elsewhere
end

-- The bound key's view (K) with its policy loaded; the functions below take it as `pol`.
local function policy()
  if not K.v then load_policy(redis.call('HMGET', P, unpack(POLICY_FIELDS))) end
  return K
end

-- The counts of L, S, W and T, read once per call (see K).
local function count_leases()
  if not K.nl then K.nl = redis.call('ZCARD', L) end
  return K.nl
end

local function count_starts()
  if not K.ns then K.ns = redis.call('ZCARD', S) end
  return K.ns
end

local function count_waiting()
  if not K.nw then K.nw = redis.call('ZCARD', W) end
  return K.nw
end

-- Remove a lease from L (1 if it was there, else 0).
local function drop_lease(id)
  local n = redis.call('ZREM', L, id)
  if K.nl then K.nl = K.nl - n end
  return n
end

-- Remove a ticket from W (1 if it was there, else 0).
local function drop_ticket(id)
  local n = redis.call('ZREM', W, id)
  if K.nw then K.nw = K.nw - n end
  return n
end

-- Set a field of T.
local function mark(id, value)
  local n = redis.call('HSET', T, id, value)
  if K.nt then K.nt = K.nt + n end
end

-- Remove a field of T (a waiting ticket's entry or a pickup mark); no call at all when T is known empty.
local function unmark(id)
  if not K.nt then K.nt = redis.call('HLEN', T) end
  if K.nt > 0 then K.nt = K.nt - redis.call('HDEL', T, id) end
end

-- Drop expired leases (with the pickup marks of those never picked up); true when there were any. Once per
-- call: the clock stands still during a call, and no lease it grants expires at `now`.
local function trim_leases(now)
  if K.leases_trimmed then return false end
  K.leases_trimmed = true
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now)
  if #expired == 0 then return false end
  redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
  if K.nl then K.nl = K.nl - #expired end
  for _, id in ipairs(expired) do unmark(id) end
  return true
end

-- Drop the starts that left the rate window (once per call and period).
local function trim_window(pol, now)
  if pol.rate > 0 and not pol.window_trimmed then
    pol.window_trimmed = true
    local n = redis.call('ZREMRANGEBYSCORE', S, '-inf', now - pol.per)
    if pol.ns then pol.ns = pol.ns - n end
  end
end

-- Drop expired leases and starts that left the window.
local function trim(pol, now)
  trim_leases(now)
  trim_window(pol, now)
end

-- P's TTL, at least `ms` and never short of the `kept` promise (starts before it refresh nothing).
local function expire_policy(pol, ms, now)
  redis.call('PEXPIRE', P, math.max(ms, pol.kept + pol.mwt - now))
end

-- Push a live lease's expiry to now + ttl: its owner holds it (an admission awaiting pickup is picked up).
-- False when the lease is unknown or expired.
local function extend(id, ttl, now)
  local score = redis.call('ZSCORE', L, id)
  if not score or tonumber(score) <= now then return false end
  redis.call('ZADD', L, 'XX', stamp(now + ttl), id)
  unmark(id)
  return true
end

-- Keep the lease set (and the policy with it) at least as long as a lease of `ttl` ms can live.
local function keep_leases(ttl, now)
  if redis.call('PTTL', L) < ttl + IDLE_MS then
    redis.call('PEXPIRE', L, ttl + IDLE_MS)
    local pol = policy()
    if not (pol.paused or pol.pinned) then expire_policy(pol, ttl + IDLE_MS + pol.mwt, now) end
  end
end

-- 0 when a start may happen now; else ms until the window or a lease expiry may allow one; -1: only an
-- event (release, resume, policy change) can. Expired leases are dropped when they matter: at the limit.
-- Call trim_window first.
local function blocked_for(pol, now)
  if pol.paused or pol.rate == 0 then return -1 end
  local wait = 0
  if pol.par >= 0 then
    local held = count_leases()
    if held >= pol.par and held > 0 then
      trim_leases(now)
      held = pol.nl
    end
    if held >= pol.par then
      local first = redis.call('ZRANGE', L, 0, 0, 'WITHSCORES')
      wait = tonumber(first[2]) - now
    end
  end
  if pol.rate > 0 then
    local used = count_starts()
    if used >= pol.rate then
      local oldest = redis.call('ZRANGE', S, used - pol.rate, used - pol.rate, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + pol.per - now)
    end
  end
  if wait > 0 then return math.max(wait, 1) end
  return 0
end

-- Start a delivery: a lease for `ttl` ms and, when a rate applies, an entry in the window; false (and
-- nothing done) when `id` holds a lease already. P, L and S are kept at least as long as the lease can live:
-- their TTLs are set twice as far as needed and P's `kept` says so, so most starts set no TTL at all. A key
-- that this start creates (L or S was empty) always gets its TTL.
local function start(pol, id, ttl, now)
  local held, used = count_leases(), pol.rate > 0 and count_starts() or 0
  if redis.call('ZADD', L, 'NX', stamp(now + ttl), id) == 0 then return false end
  pol.nl = held + 1
  if pol.rate > 0 then pol.ns = used + redis.call('ZADD', S, stamp(now), id) end
  local keep = math.max(pol.per, ttl) + IDLE_MS
  local stale = now + keep > pol.kept
  if stale or held == 0 or (pol.rate > 0 and used == 0) then
    local horizon = keep + IDLE_MS
    redis.call('PEXPIRE', L, horizon)
    if pol.rate > 0 then redis.call('PEXPIRE', S, horizon) end
    if stale then
      pol.kept = now + horizon
      pol.v[10] = pol.kept
      redis.call('HSET', P, 'kept', pol.kept)
    end
    if not (pol.paused or pol.pinned) then expire_policy(pol, horizon + pol.mwt, now) end
  end
  return true
end

-- Admit head tickets while a token and a rate slot are free. Tickets past their deadline are dropped
-- (their owner gave up or died). Tickets of other owners get a short pickup TTL and a PICKUP mark: their
-- owner renews the lease when the wake-up reaches it, so an admission nobody picks up frees its token soon,
-- and one whose owner is found dead can be revoked at once (revoke.lua) while the mark is there.
-- Appends {ticket, owner} pairs to `out`.
local function pump(pol, now, caller, pickup_ms, out)
  while count_waiting() > 0 do
    local head = redis.call('ZRANGE', W, 0, 0)[1]
    local info = redis.call('HGET', T, head)
    local owner, deadline, ttl = string.match(info or '', '^(%S+) (%d+) (%d+)$')
    if not owner or tonumber(deadline) <= now then
      drop_ticket(head)
      unmark(head)
    else
      if blocked_for(pol, now) ~= 0 then return end
      drop_ticket(head)
      ttl = tonumber(ttl)
      if owner ~= caller then
        ttl = math.min(ttl, pickup_ms)
        mark(head, PICKUP)
      else
        unmark(head)
      end
      start(pol, head, ttl, now)
      out[#out + 1] = head
      out[#out + 1] = owner
    end
  end
end

-- A token was freed (release, cancel, revoke): admit the waiters that may go now. out[2] becomes the ms
-- until the store should pump again when waiters remain that only time will let go.
local function admit_next(caller, pickup_ms, out)
  if count_waiting() == 0 then return end
  local now = now_ms()
  local pol = policy()
  trim(pol, now)
  pump(pol, now, caller, pickup_ms, out)
  if count_waiting() > 0 then out[2] = blocked_for(pol, now) end
end

-- Keep a paused or pinned key's policy until the operator lets go; otherwise it expires with the key.
local function keep_policy(pol, now)
  if pol.paused or pol.pinned then
    redis.call('PERSIST', P)
  else
    expire_policy(pol, math.max(pol.per, pol.mwt) + IDLE_MS, now)
  end
end
