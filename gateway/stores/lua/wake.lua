-- wake: tell an instance that tickets of its were admitted, if it is alive. Not an operation on a flow key
-- (lib.lua is not compiled in front): both keys carry the instance's hash tag {I}, so they share a slot.
-- KEYS: fc:alive:{I} (refreshed by the live instance), fc:inst:{I} (its inbox list, read with BLPOP)
-- ARGV: inbox_ttl_ms, "ticket key"... (none: only ask whether the instance is alive)
-- Returns the ms the instance stays alive unless it refreshes its key (0: no expiry known), having pushed; or
-- -1 when it is gone (its liveness key expired or was deleted): nothing is pushed, and the caller revokes.
local alive = redis.call('PTTL', KEYS[1])
if alive == -2 then return -1 end
if #ARGV > 1 then
  for i = 2, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return math.max(alive, 0)
