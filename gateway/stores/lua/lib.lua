-- Shared helpers, prepended to every operation script (see redis.py).
-- Every script gets the same five KEYS, all under one hash tag {K} so they live in one slot:
--   KEYS[1] fc:{K}:p  hash   policy: par rate per mw mwt (requested), ppar prate pper (pins), paused, seq, reset
--   KEYS[2] fc:{K}:l  zset   lease id -> expires at (ms)
--   KEYS[3] fc:{K}:s  zset   start id -> started at (ms): the sliding window of starts
--   KEYS[4] fc:{K}:w  zset   ticket id -> arrival sequence (FIFO waitlist)
--   KEYS[5] fc:{K}:t  hash   ticket id -> "owner deadline_ms lease_ttl_ms"
-- Numbers: -1 means unlimited. Time comes from the server only.
local P, L, S, W, T = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local IDLE_MS = 120000 -- state outlives its last use by this much (plus the longest period, lease or wait)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(value, default)
  if value == false or value == nil or value == '' then return default end
  return tonumber(value)
end

-- The effective policy: requested values with the operator's pins on top.
local function policy()
  local v = redis.call('HMGET', P, 'par', 'rate', 'per', 'mw', 'mwt', 'ppar', 'prate', 'pper', 'paused')
  local pol = {par = num(v[1], -1), rate = num(v[2], -1), per = num(v[3], 1000), mw = num(v[4], 10000),
               mwt = num(v[5], 30000), paused = v[9] == '1', pinned = false}
  if v[6] then pol.par = tonumber(v[6]); pol.pinned = true end
  if v[7] then pol.rate = tonumber(v[7]); pol.per = num(v[8], pol.per); pol.pinned = true end
  return pol
end

-- Drop expired leases and starts that left the window.
local function trim(pol, now)
  redis.call('ZREMRANGEBYSCORE', L, '-inf', now)
  if pol.rate >= 0 then
    redis.call('ZREMRANGEBYSCORE', S, '-inf', now - pol.per)
  else
    redis.call('DEL', S)
  end
end

-- 0 when a start may happen now; else ms until the window or a lease expiry may allow one; -1: only an
-- event (release, resume, policy change) can.
local function blocked_for(pol, now)
  if pol.paused or pol.rate == 0 then return -1 end
  local wait = 0
  if pol.par >= 0 then
    local active = redis.call('ZCARD', L)
    if active >= pol.par then
      local first = redis.call('ZRANGE', L, 0, 0, 'WITHSCORES')
      wait = math.max(wait, tonumber(first[2]) - now)
    end
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

local function start(pol, id, ttl, now)
  redis.call('ZADD', L, now + ttl, id)
  if pol.rate > 0 then redis.call('ZADD', S, now, id) end
end

-- Admit head tickets while a token and a rate slot are free. Tickets past their deadline are dropped
-- (their owner gave up or died). Tickets of other owners get a short pickup TTL: their owner renews the
-- lease when the wake-up reaches it, so an admission nobody picks up frees its token soon.
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
      redis.call('HDEL', T, head)
      ttl = tonumber(ttl)
      if owner ~= caller then ttl = math.min(ttl, pickup_ms) end
      start(pol, head, ttl, now)
      out[#out + 1] = head
      out[#out + 1] = owner
    end
  end
end

-- Keep the key's state for as long as anything in it can matter (window, waits, live leases), not longer.
local function touch(pol, now)
  local last = redis.call('ZRANGE', L, -1, -1, 'WITHSCORES')
  local lease_ms = last[2] and (tonumber(last[2]) - now) or 0
  local ttl = math.max(pol.per, pol.mwt, lease_ms) + IDLE_MS
  for _, key in ipairs({L, S, W, T}) do redis.call('PEXPIRE', key, ttl) end
  if pol.paused or pol.pinned then
    redis.call('PERSIST', P)
  else
    redis.call('PEXPIRE', P, ttl)
  end
end
