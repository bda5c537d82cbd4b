-- state: a snapshot of one key for the admin API.
-- KEYS: P L S W T of one flow key (lib.lua)
-- ARGV: (none)
-- Returns {exists, par, rate, per, mw, mwt, active, waiting, rate_count, window_start_ms, paused, pin_par,
-- pin_rate}; exists = 0 when the store knows nothing of the key.
local now = now_ms()
if redis.call('EXISTS', P, L, W) == 0 then return {0} end
local pol = policy()
trim(pol, now)
local extra = redis.call('HMGET', P, 'ppar', 'prate', 'reset')
local window_start = math.max(now - pol.per, num(extra[3], 0))
return {1, pol.par, pol.rate, pol.per, pol.mw, pol.mwt, redis.call('ZCARD', L), redis.call('ZCARD', W),
        redis.call('ZCARD', S), window_start, pol.paused and 1 or 0, extra[1] and 1 or 0, extra[2] and 1 or 0}
