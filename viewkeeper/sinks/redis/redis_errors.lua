-- Part of both Redis sinks' scripts (redis_apply.lua, cluster_slot.lua), put in place of their
-- "-- @include redis_errors.lua" line by viewkeeper/sinks/redis/connection.py: which errors
-- are the server's state (the call is retried), not the change's.
local TRANSIENT = { OOM = true, READONLY = true, MASTERDOWN = true, BUSY = true, LOADING = true,
  CLUSTERDOWN = true, TRYAGAIN = true, NOREPLICAS = true, MISCONF = true, NOPERM = true }

local function message(err)
  if type(err) == 'table' then return err.err or err.message or 'error' end
  return tostring(err)
end

-- The error as "CODE text" when its code is transient: Redis 7 gives "OOM command not
-- allowed...", older ones "@user_script: 12: -OOM command not allowed...\r\n".
local function transient(msg)
  msg = string.gsub(string.gsub(msg, '^[^ ]*: %d+: ', '', 1), '%s+$', '')
  msg = string.gsub(msg, '^%-', '', 1)
  local code = string.match(msg, '^(%u+)')
  if code and TRANSIENT[code] then return msg end
  return nil
end
