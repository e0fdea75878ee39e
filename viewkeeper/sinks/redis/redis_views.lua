-- viewkeeper: the short id of view ARGV[1] in the registry hash KEYS[1], assigned on first use.
-- Claims store this id instead of the view name (memory); '#<id>' maps it back to the name.
local id = redis.call('HGET', KEYS[1], ARGV[1])
if id then return id end
id = tostring(redis.call('HINCRBY', KEYS[1], '#', 1))
redis.call('HSET', KEYS[1], ARGV[1], id, '#' .. id, ARGV[1])
return id
