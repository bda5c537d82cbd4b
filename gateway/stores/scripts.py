"""The Lua operations (lua/*.lua) compiled into scripts: one per operation, and one that runs a batch.

Each operation file is the body of a function of (KEYS, ARGV) working on the keys `bind` sets; lib.lua's
helpers are compiled in front. The batch script runs several operations, on the same or different flow keys
of one slot, in one call: that is how the operations of one event-loop tick share one round trip. A flow key's
keys travel once per batch however many of its operations ride in it, and its policy and counts are read once
per call (lib.lua's K).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

BATCHED = ("enter", "release", "cancel", "pump", "renew", "revoke")
OPERATIONS = (*BATCHED, "state", "steer")
INSTANCE_SCRIPTS = ("wake",)  # on an instance's keys (hash tag {I}), not a flow key's: no lib.lua
KEYS_PER_OP = 5

_DISPATCH = """
-- batch: KEYS = the five keys of each flow key the batch works on; ARGV = operation count, then per operation:
-- name, flow key number k (its keys are KEYS[5k-4 .. 5k]), argument count, arguments...
-- Returns one reply per operation, in order.
local ops = {%s}
local results, pos = {}, 2
for i = 1, tonumber(ARGV[1]) do
  local name, k, n = ARGV[pos], tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
  local args = {unpack(ARGV, pos + 3, pos + 2 + n)}
  pos = pos + 3 + n
  bind(KEYS, 5 * (k - 1))
  results[i] = ops[name](KEYS, args)
end
return results
"""


def _read(name: str) -> str:
    return (resources.files(__package__) / "lua" / f"{name}.lua").read_text()


def _function(name: str) -> str:
    return f"local function op_{name}(KEYS, ARGV)\n{_read(name)}\nend\n"


@cache
def script(name: str) -> str:
    """The standalone script of one operation."""
    return f"{_read('lib')}\n{_function(name)}bind(KEYS, 0)\nreturn op_{name}(KEYS, ARGV)\n"


@cache
def instance_script(name: str) -> str:
    """A script on one instance's keys (see INSTANCE_SCRIPTS)."""
    return _read(name)


@cache
def batch_script() -> str:
    """One script running any sequence of the batched operations."""
    table = ", ".join(f"{name} = op_{name}" for name in BATCHED)
    return _read("lib") + "\n" + "".join(_function(name) for name in BATCHED) + _DISPATCH % table
