-- viewkeeper: forget tombstones older than ARGV[1] (epoch seconds) among the items ARGV[2..]
-- of the owner hash KEYS[1]. Each record is re-read here, so a tombstone that a newer change
-- replaced since the caller's HSCAN is kept. Returns how many were removed.
local byte, sub = string.byte, string.sub
local older_than, purged = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec then
    local lg = byte(rec, 1)
    local p = 3 + lg + byte(rec, 2 + lg)
    if sub(rec, p, p) == '~' and tonumber(sub(rec, p + 1)) < older_than then
      redis.call('HDEL', KEYS[1], ARGV[i])
      purged = purged + 1
    end
  end
end
return purged
