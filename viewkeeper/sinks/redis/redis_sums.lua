-- viewkeeper: the exact sums of counters, part of redis_apply.lua (connection.py puts this
-- file in place of its "@include redis_sums.lua" line; it uses that script's locals byte,
-- char, sub, find, concat and call). Not a script of its own.
--
-- Counters (types v, h, z: a Counter, a Counter on a hash field, a SortedSetCounter) hold
-- exact sums of integers kept as decimal text: Lua's numbers are doubles, so a sum is added
-- digit by digit unless both sides have at most 15 digits.
local function mag_cmp(x, y) -- magnitudes: digit strings without leading zeros
  if #x ~= #y then return #x < #y and -1 or 1 end
  if x == y then return 0 end
  for i = 1, #x do
    local p, q = byte(x, i), byte(y, i)
    if p ~= q then return p < q and -1 or 1 end
  end
  return 0
end

local function mag_op(x, y, sign) -- x + y (sign 1) or x - y (sign -1, x >= y)
  local out, carry, i, j = {}, 0, #x, #y
  while i > 0 or j > 0 or carry ~= 0 do
    local d = (i > 0 and byte(x, i) - 48 or 0) + sign * (j > 0 and byte(y, j) - 48 or 0) + carry
    carry = math.floor(d / 10)
    out[#out + 1] = char(48 + d % 10)
    i, j = i - 1, j - 1
  end
  local s = string.gsub(string.reverse(concat(out)), '^0+', '')
  return s == '' and '0' or s
end

local function strip(s)
  s = string.gsub(s, '^0+', '')
  return s == '' and '0' or s
end

local function add(a, b)
  if #a <= 15 and #b <= 15 then
    local x = tonumber(a) + tonumber(b)
    return x == 0 and '0' or string.format('%.0f', x)
  end
  local na, nb = sub(a, 1, 1) == '-', sub(b, 1, 1) == '-'
  local ma, mb = strip(na and sub(a, 2) or a), strip(nb and sub(b, 2) or b)
  if na == nb then
    local m = mag_op(ma, mb, 1)
    return (na and m ~= '0') and '-' .. m or m
  end
  local c = mag_cmp(ma, mb)
  if c == 0 then return '0' end
  if c > 0 then return (na and '-' or '') .. mag_op(ma, mb, -1) end
  return (nb and '-' or '') .. mag_op(mb, ma, -1)
end

local function neg(a)
  if a == '0' then return a end
  if sub(a, 1, 1) == '-' then return sub(a, 2) end
  return '-' .. a
end

-- The range of a sum: a Redis integer (signed 64-bit) or an exact sorted-set score (2^53).
local RANGE = { v = { '9223372036854775807', '9223372036854775808' },
  h = { '9223372036854775807', '9223372036854775808' },
  z = { '9007199254740992', '9007199254740992' } }

local function fits(t, x)
  if sub(x, 1, 1) == '-' then return mag_cmp(strip(sub(x, 2)), RANGE[t][2]) <= 0 end
  return mag_cmp(strip(x), RANGE[t][1]) <= 0
end

local function integer(x)
  return x and #x <= 21 and find(x, '^%-?%d+$') ~= nil
end

-- A counter's current sum ('0' when absent) or nil when its place holds something else
-- than an integer (written outside viewkeeper), then what its place holds (nil: nothing).
local function current(t, k, m)
  local x
  if t == 'v' then x = call('GET', k)
  elseif t == 'h' then x = call('HGET', k, m)
  else x = call('ZSCORE', k, m) end
  if not x then return '0', nil end
  if integer(x) then return x, x end
  return nil, x
end

-- Write x (a sum, or what the place held) at a counter's place, or remove it (x nil).
local function put(t, k, m, x)
  if t == 'v' then
    if x then call('SET', k, x) else call('DEL', k) end
  elseif t == 'h' then
    if x then call('HSET', k, m, x) else call('HDEL', k, m) end
  elseif x then call('ZADD', k, x, m)
  else call('ZREM', k, m) end
end

-- The generation of a packed version (see packing.py), packed: compares with newer().
local function gen_of(v)
  return sub(v, 1, 1 + byte(v, 1))
end

-- A rebuild of the view running (RedisSink.begin_rebuild, sums.py): the packed generation
-- above which its sums count an item's contributions (field 'shadow' of the view's claim
-- hash), the hash of those sums (identity -> sum '#' contributors, or 'x' when unknown), and
-- whether its sweep has listed the owner records (field 'sweeping'); false when no rebuild
-- runs. Read once per view and call. Field 'top' keeps the highest generation of a change
-- to the view's counters (begin_rebuild's floor is at least that).
local shadows = {}
local function shadow_of(owner, ver)
  local base = string.match(owner, '^(.*):o:%d+$')
  local ns = base .. ':ns'
  local s = shadows[base]
  if s == nil then
    local got = call('HMGET', ns, 'shadow', 'sweeping', 'top')
    s = { got[1] or false, got[2] and true or false, got[3] or false }
    shadows[base] = s
  end
  local g = gen_of(ver)
  if not s[3] or newer(g, s[3]) then
    s[3] = g
    call('HSET', ns, 'top', g)
  end
  return s[1], base .. ':sums', s[2]
end

-- The rebuild's sum of counter id after adding dsum and dcount contributors: its new field
-- ('x' once out of range, nil once no item counted there contributes) and the old one.
local function shadow_sum(skey, id, t, dsum, dcount)
  local f = call('HGET', skey, id)
  if f == 'x' then return 'x', f end
  local sum, count = '0', 0
  if f then
    sum, count = string.match(f, '^(.-)#(%d+)$')
    count = tonumber(count)
  end
  sum, count = add(sum, dsum), count + dcount
  if not fits(t, sum) then return 'x', f end
  if count <= 0 then return nil, f end
  return sum .. '#' .. count, f
end

-- The place of a counter identity ('V' key | 'H' L(key) key field | 'Z' L(key) key member).
local function place_of(id)
  local t = string.lower(sub(id, 1, 1))
  if t == 'v' then return t, sub(id, 2), '' end
  local n, p = len_at(id, 2)
  return t, sub(id, p, p + n - 1), sub(id, p + n)
end
