-- viewkeeper: apply ONE change of ONE item atomically (the layout is described in redis.py).
--
-- KEYS[1]                  the owner hash of the item's bucket
-- KEYS[2i], KEYS[2i+1]     data key and claim hash of new entry i (i = 1..n)
-- ARGV[1] item key   ARGV[2] view id   ARGV[3] packed version   ARGV[4] now (epoch seconds)
-- ARGV[5] claim hash prefix   ARGV[6] number of claim buckets
-- ARGV[7 + 4(i-1) ..]      type (V H S Z), identity, a, b of new entry i:
--                          V: value, ttl or ''   H: field, value   S: member, ''   Z: member, score
--
-- Returns {0} when stale, {-1, i, type} when key i holds the wrong type (nothing written),
-- {1, i, claim, ...} when applied, listing the entries i that were claimed by another owner.
-- Every write happens after every check: Redis does not roll back a script that fails halfway.
-- Keys of entries being retracted come from the stored owner record, not from KEYS: the
-- caller cannot know them without a second round trip (standalone Redis only, not Cluster).

local byte, char, sub, find = string.byte, string.char, string.sub, string.find
local call = redis.call
local owner, item, vid, ver, now = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local claim_prefix, buckets = ARGV[5], tonumber(ARGV[6])
local M = 2147483629 -- prime; the claim bucket is (identity as a big-endian number) mod M mod buckets

-- Lengths: one byte below 253, else 253 and four bytes. 254 marks a string that embeds the item key.
local function len_at(s, p)
  local b = byte(s, p)
  if b < 253 then return b, p + 1 end
  local b1, b2, b3, b4 = byte(s, p + 1, p + 4)
  return ((b1 * 256 + b2) * 256 + b3) * 256 + b4, p + 5
end

local function L(n)
  if n < 253 then return char(n) end
  return char(253, math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

-- Entry keys are usually built from the item key: store it once, keep only the text around it.
local function S(x)
  if #item >= 3 then
    local i = find(x, item, 1, true)
    if i then
      local suf = sub(x, i + #item)
      return char(254) .. L(i - 1) .. sub(x, 1, i - 1) .. L(#suf) .. suf
    end
  end
  return L(#x) .. x
end

local function str_at(s, p)
  local n
  if byte(s, p) == 254 then
    n, p = len_at(s, p + 1)
    local pre = sub(s, p, p + n - 1)
    n, p = len_at(s, p + n)
    return pre .. item .. sub(s, p, p + n - 1), p + n
  end
  n, p = len_at(s, p)
  return sub(s, p, p + n - 1), p + n
end

local function ident(t, k, m)
  if t == 'V' then return 'V' .. k end
  return t .. L(#k) .. k .. m
end

-- Canonical claim value: view id, then where the item key sits in the identity, or the item key.
local function claim_of(id)
  local n = #item
  if n > 0 and n < 256 then
    local i = find(id, item, 1, true)
    if i and i <= 256 then return vid .. '=' .. char(i - 1, n) end
  end
  return vid .. ':' .. item
end

local function claim_key(id)
  local h = 0
  for i = 1, #id do h = (h * 256 + byte(id, i)) % M end
  return claim_prefix .. (h % buckets)
end

-- Packed versions compare bytewise (see redis.py); Lua's '<' uses strcoll, so compare bytes.
local function newer(a, b)
  if a == b then return false end
  for i = 1, math.min(#a, #b) do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- 1. Version check against the owner record.
local rec = call('HGET', owner, item)
local oldbody
if rec then
  local lg = byte(rec, 1)
  local vend = 2 + lg + byte(rec, 2 + lg)
  if not newer(ver, sub(rec, 1, vend)) then return { 0 } end
  oldbody = sub(rec, vend + 1)
end

-- 2. The new record's body (pure computation), then what to retract: owned entries not in the
--    new set whose claim is still ours. An unchanged body (the usual update) skips all that.
local n = (#KEYS - 1) / 2
local parts = {}
for i = 1, n do
  local a, k = 7 + 4 * (i - 1), KEYS[2 * i]
  local t = ARGV[a]
  parts[i] = t == 'V' and 'V' .. S(k) or t .. S(k) .. S(ARGV[a + 2])
end
local body = n == 0 and '~' .. now or table.concat(parts)
local retract = {}
if oldbody and oldbody ~= body and sub(oldbody, 1, 1) ~= '~' then
  local new_ids = {}
  for i = 1, n do new_ids[ARGV[7 + 4 * (i - 1) + 1]] = true end
  local p = 1
  while p <= #oldbody do
    local t, k, m = sub(oldbody, p, p), nil, ''
    k, p = str_at(oldbody, p + 1)
    if t ~= 'V' then m, p = str_at(oldbody, p) end
    local id = ident(t, k, m)
    if not new_ids[id] then
      local ck = claim_key(id)
      local c = call('HGET', ck, id)
      if (not c) or c == claim_of(id) then retract[#retract + 1] = { t, k, m, id, ck, c } end
    end
  end
end

-- 3. Validate every key's type before any write. A key of the wrong type is fine only when
--    this very change retracts everything in it.
local want = { V = 'string', H = 'hash', S = 'set', Z = 'zset' }
local function vanishes(k, have)
  local cnt = 0
  for _, r in ipairs(retract) do
    local t, rk, m = r[1], r[2], r[3]
    if rk == k then
      if have == 'string' and t == 'V' then return true end
      if (have == 'set' and t == 'S' and call('SISMEMBER', k, m) == 1)
          or (have == 'zset' and t == 'Z' and call('ZSCORE', k, m))
          or (have == 'hash' and t == 'H' and call('HEXISTS', k, m) == 1) then
        cnt = cnt + 1
      end
    end
  end
  if cnt == 0 then return false end
  local card = { set = 'SCARD', zset = 'ZCARD', hash = 'HLEN' }
  return call(card[have], k) == cnt
end
for i = 1, n do
  local k = KEYS[2 * i]
  local have = call('TYPE', k)['ok']
  if have ~= 'none' and have ~= want[ARGV[7 + 4 * (i - 1)]] and not vanishes(k, have) then
    return { -1, i, have }
  end
end

-- 4. Retract.
for _, r in ipairs(retract) do
  local t, k, m = r[1], r[2], r[3]
  if t == 'V' then call('DEL', k)
  elseif t == 'H' then call('HDEL', k, m)
  elseif t == 'S' then call('SREM', k, m)
  else call('ZREM', k, m) end
  if r[6] then call('HDEL', r[5], r[4]) end
end

-- 5. Write, claim, and store the owner record.
local out = { 1 }
for i = 1, n do
  local a = 7 + 4 * (i - 1)
  local t, id, x, y = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local k, ck = KEYS[2 * i], KEYS[2 * i + 1]
  if t == 'V' then
    if y ~= '' then call('SET', k, x, 'EX', y) else call('SET', k, x) end
  elseif t == 'H' then call('HSET', k, x, y)
  elseif t == 'S' then call('SADD', k, x)
  else call('ZADD', k, y, x) end
  local mine, c = claim_of(id), call('HGET', ck, id)
  if c ~= mine then
    if c then
      out[#out + 1] = i
      out[#out + 1] = c
    end
    call('HSET', ck, id, mine)
  end
end
call('HSET', owner, item, ver .. body)
return out
