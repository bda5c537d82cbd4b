-- Shared helpers, compiled in front of every operation (see scripts.py). An operation works on the five
-- keys of one flow key, all under one hash tag {K} so they live in one slot:
--   P fc:{K}:p  hash   policy: par rate per mw mwt (requested), ppar prate pper (pins), paused, seq, reset
--   L fc:{K}:l  zset   lease id -> expires at (ms)
--   S fc:{K}:s  zset   start id -> started at (ms): the sliding window of starts
--   W fc:{K}:w  zset   ticket id -> arrival sequence (FIFO waitlist)
--   T fc:{K}:t  hash   ticket id -> "owner deadline_ms lease_ttl_ms" while it waits; PICKUP once admitted for
--                      another instance, until that owner picks the lease up (renews it) or it goes
-- Numbers: -1 means unlimited. Time comes from the server only.
local P, L, S, W, T
local IDLE_MS = 120000 -- state outlives its last use by this much (plus the longest period, lease or wait)
local PICKUP = 'pickup' -- T's mark of an admission its owner (another instance) has not picked up yet

local function bind(keys, base)
  P, L, S, W, T = keys[base + 1], keys[base + 2], keys[base + 3], keys[base + 4], keys[base + 5]
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(value, default)
  if not value or value == '' then return default end
  return tonumber(value)
end

local POLICY_FIELDS = {'par', 'rate', 'per', 'mw', 'mwt', 'ppar', 'prate', 'pper', 'paused'}

-- The effective policy from HMGET P POLICY_FIELDS: requested values with the operator's pins on top.
local function policy_of(v)
  local pol = {par = num(v[1], -1), rate = num(v[2], -1), per = num(v[3], 1000), mw = num(v[4], 10000),
               mwt = num(v[5], 30000), paused = v[9] == '1', pinned = false}
  if v[6] then pol.par = tonumber(v[6]); pol.pinned = true end
  if v[7] then pol.rate = tonumber(v[7]); pol.per = num(v[8], pol.per); pol.pinned = true end
  return pol
end

local function policy()
  return policy_of(redis.call('HMGET', P, unpack(POLICY_FIELDS)))
end

-- Drop expired leases (with the pickup marks of those never picked up) and starts that left the window.
local function trim(pol, now)
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now)
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
    for _, id in ipairs(expired) do redis.call('HDEL', T, id) end
  end
  if pol.rate > 0 then redis.call('ZREMRANGEBYSCORE', S, '-inf', now - pol.per) end
end

-- Push a live lease's expiry to now + ttl: its owner holds it (an admission awaiting pickup is picked up).
-- False when the lease is unknown or expired.
local function extend(id, ttl, now)
  local score = redis.call('ZSCORE', L, id)
  if not score or tonumber(score) <= now then return false end
  redis.call('ZADD', L, 'XX', now + ttl, id)
  redis.call('HDEL', T, id)
  return true
end

-- Keep the lease set (and the policy with it) at least as long as a lease of `ttl` ms can live.
local function keep_leases(ttl)
  if redis.call('PTTL', L) < ttl + IDLE_MS then
    redis.call('PEXPIRE', L, ttl + IDLE_MS)
    local pol = policy()
    if not (pol.paused or pol.pinned) then redis.call('PEXPIRE', P, ttl + IDLE_MS + pol.mwt) end
  end
end

-- 0 when a start may happen now; else ms until the window or a lease expiry may allow one; -1: only an
-- event (release, resume, policy change) can.
local function blocked_for(pol, now)
  if pol.paused or pol.rate == 0 then return -1 end
  local wait = 0
  if pol.par >= 0 and redis.call('ZCARD', L) >= pol.par then
    local first = redis.call('ZRANGE', L, 0, 0, 'WITHSCORES')
    wait = tonumber(first[2]) - now
  end
  if pol.rate > 0 then
    local used = redis.call('ZCARD', S)
    if used >= pol.rate then
      local oldest = redis.call('ZRANGE', S, used - pol.rate, used - pol.rate, 'WITHSCORES')
      wait = math.max(wait, tonumber(oldest[2]) + pol.per - now)
    end
  end
  if wait > 0 then return math.max(wait, 1) end
  return 0
end

-- Start a delivery: a lease for `ttl` ms and, when a rate applies, an entry in the window. Both keys are
-- kept at least as long as the lease can live.
local function start(pol, id, ttl, now)
  redis.call('ZADD', L, now + ttl, id)
  local keep = math.max(pol.per, ttl) + IDLE_MS
  redis.call('PEXPIRE', L, keep)
  if pol.rate > 0 then
    redis.call('ZADD', S, now, id)
    redis.call('PEXPIRE', S, keep)
  end
  if not (pol.paused or pol.pinned) then redis.call('PEXPIRE', P, keep + pol.mwt) end
end

-- Admit head tickets while a token and a rate slot are free. Tickets past their deadline are dropped
-- (their owner gave up or died). Tickets of other owners get a short pickup TTL and a PICKUP mark: their
-- owner renews the lease when the wake-up reaches it, so an admission nobody picks up frees its token soon,
-- and one whose owner is found dead can be revoked at once (revoke.lua) while the mark is there.
-- Appends {ticket, owner} pairs to `out`.
local function pump(pol, now, caller, pickup_ms, out)
  while true do
    local head = redis.call('ZRANGE', W, 0, 0)[1]
    if not head then return end
    local info = redis.call('HGET', T, head)
    local owner, deadline, ttl = string.match(info or '', '^(%S+) (%d+) (%d+)$')
    if not owner or tonumber(deadline) <= now then
      redis.call('ZREM', W, head)
      redis.call('HDEL', T, head)
    else
      if blocked_for(pol, now) ~= 0 then return end
      redis.call('ZREM', W, head)
      ttl = tonumber(ttl)
      if owner ~= caller then
        ttl = math.min(ttl, pickup_ms)
        redis.call('HSET', T, head, PICKUP)
      else
        redis.call('HDEL', T, head)
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
  if redis.call('EXISTS', W) == 0 then return end
  local now = now_ms()
  local pol = policy()
  trim(pol, now)
  pump(pol, now, caller, pickup_ms, out)
  if redis.call('EXISTS', W) == 1 then out[2] = blocked_for(pol, now) end
end

-- Keep a paused or pinned key's policy until the operator lets go; otherwise it expires with the key.
local function keep_policy(pol)
  if pol.paused or pol.pinned then
    redis.call('PERSIST', P)
  else
    redis.call('PEXPIRE', P, math.max(pol.per, pol.mwt) + IDLE_MS)
  end
end
