#!lua
-- viewkeeper: apply a BATCH of changes, each one atomically and in order (layout: README.md).
--
-- ARGV[1] now (epoch seconds)   ARGV[2] claim hash prefix   ARGV[3] number of buckets
-- ARGV[4] k, then k triples: a view's claim hash (vk:{view}:ns), the marker it must hold and
--         the highest write counter (field n) the client has seen there (0: none yet)
-- then, per change:  owner hash of the item's bucket, item key, view id, packed version,
--                    n (number of entries), and per entry: type (V H S Z v h z), key, a, b
--                    V: value, ttl or ''   H: field, value   S: member, ''   Z: member, score
--                    counters (README.md, "Counters"), b the item's amount (an integer):
--                    v: '', amount   h: field, amount   z: member, amount
-- (the entries of one change have distinct identities: the caller removes duplicates)
-- or a change-log group (an empty first argument, see append_group below): '', the stream,
--                    its high-water hash, its replay key prefix, maxlen or '', the MINID
--                    cutoff or '', the replay keys' ttl, the dead-letter notes' ttl, m, then
--                    per append: shard, sequence, f, and f field/value pairs (f = -1: a
--                    dead-lettered record, noted, nothing appended)
--
-- Returns { 'L', i } without writing anything when the i-th claim hash does not hold its
-- marker (the server lost the views' data, or another process re-armed or took it over:
-- viewkeeper/runtime/namespaces.py), and { 'L', i, 'back' } when it holds the marker but its
-- write counter is below what the client saw: the server went back in time (restarted from an
-- older RDB or AOF, a promoted replica that had not received every write). Then the only
-- write is to that claim: its marker is erased (and 'lost' says why), so that every process
-- and `viewkeeper check` see the namespace as lost, as after an empty restart, and the view
-- is re-armed and rebuilt; none of the changes is written.
-- Else { codes, counters, detail, detail, ... }: counters has the claims' write counters
-- after this call (each claim's n is incremented once per call, after every claim check
-- and before the first change); codes has one byte per change (and per append), '1'
-- applied (appended), '0' stale (appended before), 'x' or 'e' see the next detail: 'x' {-1, i, type} when the key of entry i holds the
-- wrong type (nothing written), 'x' {-2, i, what, argument} when an argument of entry i is
-- one Redis would refuse (what: 'ttl', 'score', 'amount' or 'type'; nothing written),
-- 'x' {-3, what, value, type, key, field or member} when a counter's sum would leave its
-- range (what 'overflow', value the sum) or its place holds no integer (what 'integer'),
-- 'x' {-4, i, claim} when counter i is claimed by another view or by an item's entry
-- (nothing written for either), 'x' {1, i, claim, ...} when applied with entries i claimed
-- by another owner, 'e' the message of a Redis error that stopped this change (see the end).
-- Every write of a change happens after every check of that change: Redis does not roll
-- back a script that fails halfway. Keys are computed here, not declared in KEYS (the keys
-- of retracted entries come from stored owner records): standalone Redis only, not Cluster.
-- One script per batch rather than per change: the per-command cost (client encoding and
-- reply parsing, the server's script call) is paid once per batch (bench/redis_pipeline.py).
-- The shebang (no flags: the script may write) makes Redis >= 7 refuse the whole call before
-- it starts when writes are refused (OOM under maxmemory, a read-only replica, MISCONF,
-- NOREPLICAS); without it Redis refuses only the first write, and once a script has written,
-- its later writes go past maxmemory. A server that cannot compile it gets this script
-- without its first line (connection.py).

local byte, char, sub, find, concat = string.byte, string.char, string.sub, string.find, table.concat
local call = redis.call
local now, claim_prefix, buckets = ARGV[1], ARGV[2], tonumber(ARGV[3])
local M = 2147483629 -- prime; the claim bucket is (identity as a big-endian number) mod M mod buckets
local want = { V = 'string', H = 'hash', S = 'set', Z = 'zset', v = 'string', h = 'hash', z = 'zset' }
local MAX_TTL = 3153600000 -- entries.MAX_TTL: 100 years, an expiry every Redis takes
local card = { set = 'SCARD', zset = 'ZCARD', hash = 'HLEN' }

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
local function S(x, item)
  if #item >= 3 then
    local i = find(x, item, 1, true)
    if i then
      local suf = sub(x, i + #item)
      return char(254) .. L(i - 1) .. sub(x, 1, i - 1) .. L(#suf) .. suf
    end
  end
  return L(#x) .. x
end

local function str_at(s, p, item)
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
local function claim_of(id, item, vid)
  local n = #item
  if n > 0 and n < 256 then
    local i = find(id, item, 1, true)
    if i and i <= 256 then return vid .. '=' .. char(i - 1, n) end
  end
  return vid .. ':' .. item
end

-- Two bytes per step (h * 65536 + 65535 < 2^53: exact in a double), the same number as one
-- byte per step; remembered for the call (a counter is often touched by every change).
local claim_keys = {}
local function claim_key(id)
  local ck = claim_keys[id]
  if ck then return ck end
  local h, n = 0, #id
  for i = 1, n - 1, 2 do
    local b1, b2 = byte(id, i, i + 1)
    h = (h * 65536 + b1 * 256 + b2) % M
  end
  if n % 2 == 1 then h = (h * 256 + byte(id, n)) % M end
  ck = claim_prefix .. (h % buckets)
  claim_keys[id] = ck
  return ck
end

-- Packed versions compare bytewise (see packing.py); Lua's '<' uses strcoll, so compare bytes.
local function newer(a, b)
  if a == b then return false end
  for i = 1, math.min(#a, #b) do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- Whether the key k (of type have) holds nothing but entries that `retract` removes.
local function vanishes(k, have, retract)
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
  return call(card[have], k) == cnt
end

-- @include redis_sums.lua (counters' exact sums; sinks/redis/connection.py puts it here)

-- What Redis would refuse in an entry's arguments (type t, b = ttl, score or amount):
-- 'ttl', 'score', 'amount' or 'type', else nil. The client sends none of these; checked
-- anyway, before any write, since a command failing halfway through a change would leave it
-- half-written. A ttl is whole seconds from 1 to MAX_TTL (SET ... EX refuses one whose
-- milliseconds overflow); a score what Redis' strtod takes: inf or a finite number, no NaN,
-- no blank, no overflow; an amount an integer in its counter's range.
local function refused(t, b)
  if t == 'V' then
    if b ~= '' and (#b > 10 or not find(b, '^[1-9]%d*$') or tonumber(b) > MAX_TTL) then
      return 'ttl'
    end
  elseif t == 'Z' then
    local l = string.lower(b)
    if l == 'inf' or l == '+inf' or l == '-inf' then return nil end
    local x = tonumber(b)
    if not x or x ~= x or x == math.huge or x == -math.huge or find(b, '%s')
        or (x == 0 and find(string.match(b, '^[^eE]*'), '[1-9]')) then -- underflow
      return 'score'
    end
  elseif RANGE[t] then
    if not integer(b) or not fits(t, b) then return 'amount' end
  elseif not want[t] then
    return 'type'
  end
  return nil
end

-- One change whose arguments start at ARGV[a]; returns its code and its detail (or nil).
local function apply(a)
  local owner, item, vid, ver, n = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], tonumber(ARGV[a + 4])
  local e0 = a + 5 -- entry i's arguments start at e0 + 4 (i - 1)

  -- 1. Version check against the owner record.
  local rec = call('HGET', owner, item)
  local oldbody
  if rec then
    local lg = byte(rec, 1)
    local vend = 2 + lg + byte(rec, 2 + lg)
    if not newer(ver, sub(rec, 1, vend)) then return '0', nil end
    oldbody = sub(rec, vend + 1)
  end

  -- 2. The new record's body (pure computation), then what to retract: owned entries not in
  --    the new set whose claim is still ours. An unchanged body (the usual update) skips that.
  --    Counters (v, h, z) are kept apart: what changes is their sums (step 3).
  local parts, ids, counters = {}, {}, {}
  for i = 1, n do
    local e = e0 + 4 * (i - 1)
    local t, k = ARGV[e], ARGV[e + 1]
    if t == 'V' or t == 'v' then
      parts[i] = t .. S(k, item)
      ids[i] = 'V' .. k
    else
      parts[i] = t .. S(k, item) .. S(ARGV[e + 2], item)
      ids[i] = string.upper(t) .. L(#k) .. k .. ARGV[e + 2]
    end
    if RANGE[t] then
      parts[i] = parts[i] .. L(#ARGV[e + 3]) .. ARGV[e + 3]
      counters[ids[i]] = { t, k, ARGV[e + 2], nil, ARGV[e + 3], i }
    end
  end
  local body = n == 0 and '~' .. now or concat(parts)
  local new_ids = {} -- identity -> the entry type this change writes there
  for i = 1, n do new_ids[ids[i]] = ARGV[e0 + 4 * (i - 1)] end
  local retract, replaced = {}, {}
  local changed = oldbody ~= body
  if oldbody and changed and sub(oldbody, 1, 1) ~= '~' then
    local p = 1
    while p <= #oldbody do
      local t, k, m = sub(oldbody, p, p), nil, ''
      k, p = str_at(oldbody, p + 1, item)
      if t ~= 'V' and t ~= 'v' then m, p = str_at(oldbody, p, item) end
      local id = ident(string.upper(t), k, m)
      if RANGE[t] then -- a counter this item contributed to: its amount is retracted
        local amt
        amt, p = str_at(oldbody, p, item)
        local c = counters[id] or { t, k, m, nil, '0', nil }
        c[4] = amt
        counters[id] = c
      elseif new_ids[id] ~= t then
        local ck = claim_key(id)
        local c = call('HGET', ck, id)
        if (not c) or c == claim_of(id, item, vid) then
          -- a Value that becomes a counter of this item is replaced by its sum (step 6)
          if RANGE[new_ids[id] or 'V'] then replaced[id] = true
          else retract[#retract + 1] = { t, k, m, id, ck, c } end
        end
      end
    end
  end

  -- Counters this item alone contributed to and no longer does: their place vanishes (a
  -- counter may move to another type at the same key).
  local mine = vid .. '#'
  local gone, rv = {}, retract
  if changed then
    for id, c in pairs(counters) do
      if c[4] and not c[6] then
        c.cl = call('HGET', claim_key(id), id)
        if c.cl == mine .. '1' then gone[#gone + 1] = { string.upper(c[1]), c[2], c[3] } end
      end
    end
    if #gone > 0 then
      rv = {}
      for _, r in ipairs(retract) do rv[#rv + 1] = r end
      for _, r in ipairs(gone) do rv[#rv + 1] = r end
    end
  end

  -- 3. Validate before any write: every argument (one type per key), every key's type, and
  --    read the claims (HGET fails there, not after a write, on a claim key that is not a
  --    hash). A key of the wrong type is fine only when this change retracts all it holds.
  local types, claims = {}, {}
  for i = 1, n do
    local e = e0 + 4 * (i - 1)
    local t, k = ARGV[e], ARGV[e + 1]
    local bad = refused(t, ARGV[e + 3])
    if bad then return 'x', { -2, i, bad, ARGV[e + 3] } end
    if types[k] and types[k] ~= want[t] then return 'x', { -2, i, 'type', t } end
    types[k] = want[t]
    if not RANGE[t] then -- a counter's key: checked when its sum is read (below)
      local have = call('TYPE', k)['ok']
      if have ~= 'none' and have ~= want[t] and not vanishes(k, have, retract) then
        return 'x', { -1, i, have }
      end
    end
    local ck = claim_key(ids[i])
    claims[i] = { ck, call('HGET', ck, ids[i]) }
  end
  -- A retracted entry whose key now holds another type (replaced outside viewkeeper) is gone
  -- already: its key is left alone (SREM there would fail, DEL delete someone else's data).
  for _, r in ipairs(retract) do
    if call('TYPE', r[2])['ok'] ~= want[r[1]] then r.gone = true end
  end
  -- Counters: each one's new sum and number of contributors, computed before any write
  -- (README.md, "Counters"). The claim of a counter is the view id, '#' and how many of the
  -- view's items contribute to it (a counter none contributes to is removed). A counter
  -- claimed by anything else fails the change (nothing written); one this item contributed
  -- to that another view's counter holds now is no longer ours: left alone. A counter whose
  -- place holds another type now (replaced outside viewkeeper) only counts its contributors.
  -- A rebuild running keeps sums of its own beside (shadow_of): see the end of the loop.
  local sums, freed, shadow = {}, {}, {}
  if next(counters) then
    local floor, skey, sweeping = shadow_of(owner, ver)
    local into = floor and newer(gen_of(ver), floor) -- this change counts in the rebuild's sums
    local was = into and rec and newer(gen_of(rec), floor) -- and the item's old contribution
    for id, c in pairs(counters) do
      local t, k, m, old, new, i = c[1], c[2], c[3], c[4], c[5], c[6]
      local moves = changed and (old ~= new or (old == nil) ~= (i == nil)) -- the live sum
      -- The rebuild's sums count this item's new contribution, less its old one when that
      -- was counted there (its record's generation is above the floor too). A change at or
      -- below the floor (a page read before the rebuild began, applied late) that lands once
      -- the sweep listed the owner records moves the live sum only: that counter's rebuilt
      -- sum is then unknown ('x': not settled, left live). Before, the item is re-read above
      -- the floor or retracted by the sweep, which puts it right in the sums.
      if into and (changed or not was) then
        local so, sn = was and old or nil, i and new or nil
        if so ~= sn then
          local f, before = shadow_sum(skey, id, t, add(sn or '0', neg(so or '0')),
            (sn and 1 or 0) - (so and 1 or 0))
          shadow[#shadow + 1] = { skey, id, f, before }
        end
      elseif floor and not into and moves and sweeping then
        shadow[#shadow + 1] = { skey, id, 'x', call('HGET', skey, id) }
      end
      if changed then
        local ck = i and claims[i][1] or claim_key(id)
        local cl = c.cl
        if cl == nil then cl = i and claims[i][2] or call('HGET', ck, id) end
        if replaced[id] then cl = false end -- this item's Value there becomes this counter
        local ours = cl and sub(cl, 1, #mine) == mine
        if cl and not ours then
          if i then return 'x', { -4, i, cl } end
        elseif moves then
          -- the read fails only on a key of another type (checked then, not before)
          local fine, cur, held = pcall(current, t, k, m)
          local other = not fine
          if other then
            local have = call('TYPE', k)['ok']
            if i and not vanishes(k, have, rv) then return 'x', { -1, i, have } end
            cur, held = '0', nil
          end
          local count = (ours and tonumber(sub(cl, #mine + 1)) or 0) + (i and 1 or 0) - (old and 1 or 0)
          if other and not i then -- the place was replaced: only the claim counts down
            sums[#sums + 1] = { t, k, m, nil, count, ck, id, nil, cl, noput = true }
          else
            if replaced[id] then cur = '0' end
            if not cur then return 'x', { -3, 'integer', held, t, k, m } end
            local sum = add(add(cur, new), neg(old or '0'))
            if not fits(t, sum) then return 'x', { -3, 'overflow', sum, t, k, m } end
            if not i and new_ids[id] then -- a counter that became a Value of this item
              if count <= 0 then freed[id] = true end
            else
              sums[#sums + 1] = { t, k, m, sum, count, ck, id, held, cl }
            end
          end
        end
      end
    end
  end
  -- A Value, HashField or SortedSetMember where a counter is: refused (it would overwrite the
  -- sum of other items), unless this item was the counter's last contributor.
  for i = 1, n do
    local c = claims[i][2]
    if c and not RANGE[ARGV[e0 + 4 * (i - 1)]] and find(c, '^%d+#') and not freed[ids[i]] then
      return 'x', { -4, i, c }
    end
  end

  -- 4. Retract. Nothing below can fail: every key's type and every argument was checked.
  for _, r in ipairs(retract) do
    local t, k, m = r[1], r[2], r[3]
    if r.gone then -- nothing to remove
    elseif t == 'V' then call('DEL', k)
    elseif t == 'H' then call('HDEL', k, m)
    elseif t == 'S' then call('SREM', k, m)
    else call('ZREM', k, m) end
    if r[6] then call('HDEL', r[5], r[4]) end
  end

  -- 5. Write and claim.
  local out
  for i = 1, n do
    local e = e0 + 4 * (i - 1)
    local t, k, x, y = ARGV[e], ARGV[e + 1], ARGV[e + 2], ARGV[e + 3]
    if not RANGE[t] then
      if t == 'V' then
        if y ~= '' then call('SET', k, x, 'EX', y) else call('SET', k, x) end
      elseif t == 'H' then call('HSET', k, x, y)
      elseif t == 'S' then call('SADD', k, x)
      else call('ZADD', k, y, x) end
      local id = ids[i]
      local ck, c = claims[i][1], claims[i][2]
      if freed[id] then c = nil end
      local claim = claim_of(id, item, vid)
      if c ~= claim then
        if c then
          out = out or { 1 }
          out[#out + 1] = i
          out[#out + 1] = c
        end
        call('HSET', ck, id, claim)
      end
    end
  end
  -- 6. The counters' new sums and claims (removals first: a counter may move to another type
  --    at its key), the rebuild's sums, then the owner record. These writes are not
  --    idempotent (a sum is read, then written): an ACL that refuses one of them (NOPERM,
  --    the only failure left) restores those written, so that the change, written again by
  --    the client's retry, is counted once. The writes before are idempotent.
  local done, sdone = {}, {}
  local ok, err = pcall(function()
    for pass = 1, 2 do
      for _, x in ipairs(sums) do
        local t, k, m, sum, count, ck, id = unpack(x, 1, 7)
        if (count <= 0) == (pass == 1) then
          done[#done + 1] = x
          if not x.noput then put(t, k, m, count > 0 and sum or nil) end
          if count <= 0 then call('HDEL', ck, id)
          elseif x[9] ~= mine .. count then call('HSET', ck, id, mine .. count) end
        end
      end
    end
    for _, s in ipairs(shadow) do
      sdone[#sdone + 1] = s
      if s[3] then call('HSET', s[1], s[2], s[3]) else call('HDEL', s[1], s[2]) end
    end
    call('HSET', owner, item, ver .. body)
  end)
  if not ok then
    for j = #sdone, 1, -1 do
      local s = sdone[j]
      if s[4] then pcall(call, 'HSET', s[1], s[2], s[4]) else pcall(call, 'HDEL', s[1], s[2]) end
    end
    for j = #done, 1, -1 do
      local x = done[j]
      local t, k, m, _, _, ck, id, held, cl = unpack(x, 1, 9)
      if not x.noput then pcall(put, t, k, m, held) end
      if cl then pcall(call, 'HSET', ck, id, cl) else pcall(call, 'HDEL', ck, id) end
    end
    error(err)
  end
  if out then return 'x', out end
  return '1', nil
end

-- The end of a rebuild (RedisSink.sweep, maintenance.py): counters set to the rebuild's sums
-- ('#', the view's claim hash, its sums hash, the view id, the sums' epoch when the sweep
-- began, m, then m counter identities). Each one is set to its sum there and its claim to its
-- contributors, or removed when no item counted there contributes: what a counter was
-- changed to outside viewkeeper (or lost) is repaired. Left alone (code 's'): a counter
-- another view or entry holds, one whose partial sum left its range, one whose place holds
-- another type. Codes: '1' repaired, '0' right already, 's' left alone, 'n' not those sums
-- (another rebuild settled them, or made them again, since: all 'n').
local function finalize_group(a, codes)
  local ns, skey, vid, epoch, m = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], tonumber(ARGV[a + 5])
  local open = call('HGET', ns, 'shadow_epoch') == epoch
  local mine = vid .. '#'
  for j = a + 6, a + 5 + m do
    local id, code = ARGV[j], 'n'
    if open then
      local t, k, mm = place_of(id)
      local ck = claim_key(id)
      local cl, f = call('HGET', ck, id), call('HGET', skey, id)
      local have = call('TYPE', k)['ok']
      if (cl and sub(cl, 1, #mine) ~= mine) or f == 'x' or (have ~= 'none' and have ~= want[t]) then
        code = 's'
      elseif not f then
        code = '0'
        if cl then
          put(t, k, mm, nil)
          call('HDEL', ck, id)
          code = '1'
        end
      else
        local sum, count = string.match(f, '^(.-)#(%d+)$')
        local _, held = current(t, k, mm)
        code = '0'
        if held ~= sum or cl ~= mine .. count then
          put(t, k, mm, sum)
          call('HSET', ck, id, mine .. count)
          code = '1'
        end
      end
    end
    codes[#codes + 1] = code
  end
  return a + 6 + m
end

-- A command that fails inside one change (nothing foreseen does: types, scores and sizes are
-- checked first) fails that change alone, reported 'e' with Redis' message; the others go on.
-- Except when the server refuses writes for now (its state, not the change's): then the
-- whole call ends with that error, which the client retries. Redis refuses the first write
-- of a call in that state, so nothing of this change was written; the changes before it in
-- the call were applied completely, and sent again they answer stale.
-- NOPERM (an ACL refusing a key) may come after this change's first write: its owner record
-- is written last, so the client's retry writes the whole change again (apply.py).
-- @include redis_errors.lua (the server's transient errors; put here like redis_sums.lua)

-- Claims first: a namespace that lost its data (or changed hands, or went back in time)
-- gets no write at all. A claim key that is not a hash (overwritten) is a lost claim too.
local k = tonumber(ARGV[4])
local a = 5
for i = 1, k do
  local ok, got = pcall(call, 'HMGET', ARGV[a], 'marker', 'n')
  if not ok then
    local refused = transient(message(got))
    if refused then return redis.error_reply(refused) end
    return { 'L', tostring(i) }
  end
  if got[1] ~= ARGV[a + 1] then return { 'L', tostring(i) } end
  local n = 0
  if got[2] then n = find(got[2], '^%d%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?%d?$') and tonumber(got[2]) end
  if not n or n < tonumber(ARGV[a + 2]) then
    local ok2, err = pcall(function()
      call('HDEL', ARGV[a], 'marker')
      call('HSET', ARGV[a], 'lost', 'write counter ' .. tostring(got[2]) .. ' below ' ..
        ARGV[a + 2] .. ' seen by a client at ' .. now .. ': the server went back in time')
    end)
    if not ok2 then
      local refused = transient(message(err))
      if refused then return redis.error_reply(refused) end
    end
    return { 'L', tostring(i), 'back' }
  end
  a = a + 3
end
-- The write counters (the first write of the call: refused, it ends the call, as below).
local counters = {}
for i = 1, k do
  local ok, n = pcall(call, 'HINCRBY', ARGV[5 + 3 * (i - 1)], 'n', 1)
  if not ok then
    local msg = message(n)
    return redis.error_reply(transient(msg) or msg)
  end
  counters[i] = n
end

-- Change-log sequences are sent without leading zeros: the longer one is the greater.
local function above(x, y)
  if #x ~= #y then return #x > #y end
  return newer(x, y)
end

-- One append of a change-log group (arguments at ARGV[p]); '1' appended, '0' appended before.
-- Records of one shard come in stream order: the high-water hash keeps, per shard, the
-- highest sequence appended (field SHARD) and when (field @SHARD, for the purge), and a
-- record at or below it was appended already — unless it was dead-lettered: such a record
-- is noted in a key of its own (prefix .. sequence = 'dl', for dl_ttl), and whichever way
-- comes first appends it and replaces the note with the time: a re-read of its page (the
-- view fixed, viewkeeper upgraded, an operator's fix after on_error: halt) or its dead
-- letter replayed. A record sent outside its shard's order (a replay, the Lambda handler:
-- shard '') is remembered in that key too, for ttl. A note for a record the mark already
-- passed with no note (another process, whose view did not fail, appended it) records it
-- as appended instead, so that its dead letter's replay answers '0'.
local function append_one(stream, hw, rp, cap, ttl, dl_ttl, p)
  local shard, seq, f = ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2])
  local rk = rp .. seq
  local r = call('GET', rk)
  local h = shard ~= '' and call('HGET', hw, shard)
  local below = h and not above(seq, h)
  if f < 0 then
    if not r then call('SET', rk, below and now or 'dl', 'EX', dl_ttl) end
    return '0'
  end
  if (r and r ~= 'dl') or (below and not r) then return '0' end
  -- The bookkeeping first, then the XADD, undone if the XADD fails: an append is all or
  -- nothing (a refused bookkeeping write fails before anything is written; an ACL that lets
  -- the bookkeeping be written lets it be restored). A noted record below the mark leaves
  -- the mark where it is.
  local raise = shard ~= '' and not below
  local old_at
  if raise then
    old_at = call('HGET', hw, '@' .. shard)
    call('HSET', hw, shard, seq, '@' .. shard, now)
  end
  if r then call('SET', rk, now, 'EX', dl_ttl)
  elseif shard == '' then call('SET', rk, now, 'EX', ttl) end
  local cmd = { 'XADD', stream }
  if cap ~= '' then cmd[3], cmd[4], cmd[5] = 'MAXLEN', '~', cap end
  cmd[#cmd + 1] = '*'
  for i = p + 3, p + 2 + 2 * f do cmd[#cmd + 1] = ARGV[i] end
  local ok, err = pcall(call, unpack(cmd))
  if not ok then
    if raise then
      if h then call('HSET', hw, shard, h, '@' .. shard, old_at or now)
      else call('HDEL', hw, shard, '@' .. shard) end
    end
    if r then call('SET', rk, r, 'EX', dl_ttl)
    elseif shard == '' then call('DEL', rk) end
    error(err)
  end
  return '1'
end

-- A change-log group starting at ARGV[a] (its first argument ''): codes and details into
-- the reply's, returns where the next group or change starts. Every key's type is checked
-- before the first write; an append that fails fails alone ('e'), as a change does.
local function append_group(a, codes, reply)
  local stream, hw, rp, cap, minid = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5]
  local ttl, dl_ttl, m, p = ARGV[a + 6], ARGV[a + 7], tonumber(ARGV[a + 8]), a + 9
  local bad
  for _, pair in ipairs({ { stream, 'stream' }, { hw, 'hash' } }) do
    local have = call('TYPE', pair[1])['ok']
    if have ~= 'none' and have ~= pair[2] then
      bad = 'WRONGTYPE key ' .. pair[1] .. ' holds a ' .. have .. ', not a ' .. pair[2]
    end
  end
  local added = false
  for _ = 1, m do
    local code, detail = 'e', bad
    if not bad then
      local ok, got = pcall(append_one, stream, hw, rp, cap, ttl, dl_ttl, p)
      if ok then code = got else
        detail = message(got)
        local refused = transient(detail)
        if refused then return nil, refused end
      end
    end
    if code == 'e' then -- dead-lettered by the client: noted as such
      pcall(call, 'SET', rp .. ARGV[p + 1], 'dl', 'EX', dl_ttl, 'NX')
    end
    codes[#codes + 1] = code
    if code == 'e' then reply[#reply + 1] = detail end
    if code == '1' then added = true end
    p = p + 3 + 2 * math.max(0, tonumber(ARGV[p + 2]))
  end
  -- trimming is housekeeping: a refusal (an ACL, say) must not fail the appends made
  if minid ~= '' and added then pcall(call, 'XTRIM', stream, 'MINID', '~', minid) end
  return p
end

local codes, reply = {}, { '', counters }
while a <= #ARGV do
  local nxt, refused
  if ARGV[a] == '' then
    nxt, refused = append_group(a, codes, reply)
  elseif ARGV[a] == '#' then
    nxt = finalize_group(a, codes)
  else
    nxt = a + 5 + 4 * tonumber(ARGV[a + 4])
    local ok, code, detail = pcall(apply, a)
    if not ok then
      code = message(code)
      refused = transient(code)
      code, detail = 'e', code
    end
    codes[#codes + 1] = code
    if detail then reply[#reply + 1] = detail end
  end
  if refused then return redis.error_reply(refused) end
  a = nxt
end
reply[1] = concat(codes)
return reply
