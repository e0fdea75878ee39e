#!lua
-- viewkeeper on Redis Cluster: one step of the apply protocol in ONE hash slot (README.md in
-- this package, "The protocol"). Every key it touches is declared in KEYS, all in one slot.
--
-- KEYS[1] the slot's bookkeeping hash vk:{TAG}:c: entry claims (field = entry identity) and,
--         per view, its marker (field '#' .. view id) and write counter ('#' .. view id .. 'n');
--         '#w' counts the calls that checked no view
-- ARGV[1] the step: O (read an owner record, note what it may write), E (entries: write or
--         retract), F (write an owner record if it is still what was read), P (forget pending
--         entries), K (forget old entry tombstones)
-- ARGV[2] now (epoch seconds)   ARGV[3] k, then k triples: view id, the marker the slot must
--         hold for it, the highest write counter the client saw there (0: none yet)
-- then the step's own arguments (below).
--
-- Returns { 'L', i } when the slot does not hold the i-th view's marker (its data was lost:
-- a node restarted empty, a FLUSHALL, a replica promoted empty; or the view was re-armed),
-- { 'L', i, 'back' } when it holds it with a write counter below what the client saw (a
-- replica promoted before it had every write): nothing written. Else { codes, counters,
-- details... }: one code per item of the step, and the write counters after this call.
--
-- Packed versions compare bytewise (README.md of the Redis sink, "Encodings"). An entry's
-- claim (field = its identity) is '+', L(#owner) owner and the packed version it was written
-- at; an owner's retraction mark (field '-' L(#owner) owner identity) the packed version it
-- was retracted at and the time. owner = view id .. ':' .. item key.

local byte, char, sub, find, concat = string.byte, string.char, string.sub, string.find, table.concat
local call = redis.call
local op, now = ARGV[1], ARGV[2]
local CLAIMS = KEYS[1]

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

-- a > b for packed versions (bytewise; a prefix is the smaller)
local function newer(a, b)
  if a == b then return false end
  for i = 1, math.min(#a, #b) do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then return x > y end
  end
  return #a > #b
end

-- @include redis_sums.lua (counters' exact sums; sinks/redis/connection.py puts it here)

-- the packed version at the start of s (an owner record or after a claim's owner), and what follows
local function version_at(s, p)
  local lg = byte(s, p)
  local e = p + 1 + lg + byte(s, p + 1 + lg)
  return sub(s, p, e), e + 1
end

-- One entry of an owner record body or of a pending list: t L(#k) k [L(#m) m]. Returns the
-- part's text and where the next one starts.
local function part_at(s, p)
  local t = sub(s, p, p)
  local n, q = len_at(s, p + 1)
  q = q + n
  if t ~= 'V' and t ~= 'v' then
    n, q = len_at(s, q)
    q = q + n
  end
  local place = sub(s, p, q - 1)
  if t == 'v' or t == 'h' or t == 'z' then -- a counter: its amount follows, not its place
    n, q = len_at(s, q)
    q = q + n
  end
  return place, q
end

local function body_parts(body)
  local set = {}
  if body and sub(body, 1, 1) ~= '~' then
    local p = 1
    while p <= #body do
      local part
      part, p = part_at(body, p)
      set[part] = true
    end
  end
  return set
end

-- A pending list: L(#v) v L(#part) part, repeated. As an array of { version, part }.
local function pending_of(raw)
  local out = {}
  if raw then
    local p = 1
    while p <= #raw do
      local n
      n, p = len_at(raw, p)
      local v = sub(raw, p, p + n - 1)
      n, p = len_at(raw, p + n)
      out[#out + 1] = { v, sub(raw, p, p + n - 1) }
      p = p + n
    end
  end
  return out
end

local function pending_text(list)
  local parts = {}
  for _, x in ipairs(list) do parts[#parts + 1] = L(#x[1]) .. x[1] .. L(#x[2]) .. x[2] end
  return table.concat(parts)
end

-- A live claim (field = identity): '+', L(#owner) owner, packed version; or a counter's
-- claim: '#', its view id, '#', how many items contribute to it, '#', the sum of their
-- contributions (what the counter holds unless it was changed outside viewkeeper).
local function claim_of(raw)
  if not raw then return nil end
  if sub(raw, 1, 1) == '#' then return { counter = raw, owner = raw, version = '' } end
  local n, p = len_at(raw, 2)
  return { owner = sub(raw, p, p + n - 1), version = (version_at(raw, p + n)) }
end

local function claim_text(owner, ver)
  return '+' .. L(#owner) .. owner .. ver
end

-- An owner's retraction mark for an entry (field = tomb_field(owner, identity)): the packed
-- version it was retracted at, then the time. Kept per (entry, owner), beside whoever claims
-- the entry now, so that no older write of that owner lands later.
local function tomb_field(owner, id)
  return '-' .. L(#owner) .. owner .. id
end

-- @include redis_errors.lua (the server's transient errors; put here like redis_sums.lua)

-- The views' markers in this slot, then their write counters (the call's first write).
local k = tonumber(ARGV[3])
local a = 4
for i = 1, k do
  local ok, got = pcall(call, 'HMGET', CLAIMS, '#' .. ARGV[a], '#' .. ARGV[a] .. 'n')
  if not ok then -- not a hash (overwritten outside viewkeeper): the slot lost its bookkeeping
    local refused = transient(message(got))
    if refused then return redis.error_reply(refused) end
    return { 'L', tostring(i) }
  end
  if got[1] ~= ARGV[a + 1] then return { 'L', tostring(i) } end
  local n = tonumber(got[2] or '0') or 0
  if n < tonumber(ARGV[a + 2]) then return { 'L', tostring(i), 'back' } end
  a = a + 3
end
local counters = {}
for i = 1, k do
  local ok, n = pcall(call, 'HINCRBY', CLAIMS, '#' .. ARGV[4 + 3 * (i - 1)] .. 'n', 1)
  if not ok then
    local msg = message(n)
    return redis.error_reply(transient(msg) or msg)
  end
  counters[i] = n
end
-- Every call writes, so that WAIT on its connection covers it even when nothing else changed
-- (connection.py, _send_node): one that checks no view counts itself in the field '#w'.
if k == 0 then call('HINCRBY', CLAIMS, '#w', 1) end

local codes, details = {}, {}

-- O: read owner records (KEYS[2] owner hash, KEYS[3] pending hash). Per change: item key,
-- packed version v, m, then m parts the change will write. A change at or below the record's
-- version is stale ('s': nothing noted). Else ('o') the parts that neither the record lists
-- nor the pending list holds at v or above are noted there at v, before the change writes
-- them: whoever reads this record later knows they may exist. Details: record, pending list.
if op == 'O' then
  local c = tonumber(ARGV[a])
  local p = a + 1
  for _ = 1, c do
    local item, v, m = ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2])
    local rec = call('HGET', KEYS[2], item)
    local praw = call('HGET', KEYS[3], item)
    local code = 'o'
    if rec and not newer(v, (version_at(rec, 1))) then
      code = 's'
    elseif m > 0 then
      local listed = {}
      if rec then
        local _, q = version_at(rec, 1)
        listed = body_parts(sub(rec, q))
      end
      local pend = pending_of(praw)
      local changed = false
      for j = p + 3, p + 2 + m do
        local part = ARGV[j]
        if not listed[part] then
          local found = false
          for _, x in ipairs(pend) do
            if x[2] == part then
              found = true
              if newer(v, x[1]) then x[1] = v; changed = true end
            end
          end
          if not found then pend[#pend + 1] = { v, part }; changed = true end
        end
      end
      if changed then
        praw = pending_text(pend)
        call('HSET', KEYS[3], item, praw)
      end
    end
    codes[#codes + 1] = code
    details[#details + 1] = rec or false
    details[#details + 1] = praw or false
    p = p + 3 + m
  end
  return { table.concat(codes), counters, unpack(details) }
end

-- E: entries of this slot, in groups (one per change): g, then per group n and n entries.
-- Per entry: kind, owner, packed version t, type (V H S Z), key's index in KEYS, field or
-- member, value or score, ttl or ''. Kinds:
--   w  write at t: stale ('0') when this owner claims the entry at a version above t, or
--      retracted it above t; over another owner's live claim it writes and answers 'c' with
--      that owner (a view bug, as on standalone)
--   r  retract at t: when this owner claims the entry at t or below, the entry is removed and
--      the claim released; in any case (unless this owner claims it above t: '0') this
--      owner's retraction mark is raised to t, which makes any write of this owner below t
--      stale here, whoever claims the entry meanwhile
-- A group is checked before its first write. A key holding another type than an entry
-- written there: when everything in it is this owner's, claimed above t, the write is stale;
-- claimed at t or below (older entries of the item, not retracted yet), they are retracted at
-- t first; anything else there (another owner's, no claim, over 1000 elements) fails the
-- whole group ('x', detail 'type: <type>'; nothing of it written in this slot). A retraction
-- whose key holds another type leaves the key alone (the entry is gone already).
local want = { V = 'string', H = 'hash', S = 'set', Z = 'zset' }
local function ident(ty, key, x)
  if ty == 'V' then return 'V' .. key end
  return ty .. L(#key) .. key .. x
end
local letter = { string = 'V', hash = 'H', set = 'S', zset = 'Z' }
-- The identities of what a key of type `have` holds (nil when it is too big to look at).
local function held(key, have)
  local t = letter[have]
  if not t then return nil end
  if t == 'V' then return { 'V' .. key } end
  local cmd = { H = 'HLEN', S = 'SCARD', Z = 'ZCARD' }
  if call(cmd[t], key) > 1000 then return nil end
  local members
  if t == 'H' then members = call('HKEYS', key)
  elseif t == 'S' then members = call('SMEMBERS', key)
  else members = call('ZRANGE', key, 0, -1) end
  local out = {}
  for i, m in ipairs(members) do out[i] = t .. L(#key) .. key .. m end
  return out
end

local function remove(ty, key, x)
  if call('TYPE', key)['ok'] ~= want[ty] then return end
  if ty == 'V' then call('DEL', key)
  elseif ty == 'H' then call('HDEL', key, x)
  elseif ty == 'S' then call('SREM', key, x)
  else call('ZREM', key, x) end
end

-- Raise owner's retraction mark for id to t (never lower it).
local function mark(owner, id, t)
  local tf = tomb_field(owner, id)
  local raw = call('HGET', CLAIMS, tf)
  if not raw or newer(t, (version_at(raw, 1))) then call('HSET', CLAIMS, tf, t .. now) end
end

-- Whether owner's write at t of id is stale: it claims id above t, or retracted it above t.
local function stale_write(owner, id, t, cl)
  if cl and cl.owner == owner and newer(cl.version, t) then return true end
  local raw = call('HGET', CLAIMS, tomb_field(owner, id))
  return raw ~= false and raw ~= nil and newer((version_at(raw, 1)), t)
end

local COUNTER = { v = 'V', h = 'H', z = 'Z' }
-- A counter's contribution by an owner (field '&' L(#owner) owner identity): the packed
-- version it was written at, then the amount.
local function contribution(owner, id)
  local raw = call('HGET', CLAIMS, '&' .. L(#owner) .. owner .. id)
  if not raw then return nil end
  local ver, q = version_at(raw, 1)
  return { version = ver, amount = sub(raw, q) }
end

local function mark_above(owner, id, t)
  local raw = call('HGET', CLAIMS, tomb_field(owner, id))
  return raw ~= false and raw ~= nil and newer((version_at(raw, 1)), t)
end

-- A key holding another type (have) than entry o writes there: 'stale' when everything in
-- it is this item's at a version above o's, 'clear' and their identities when it is this
-- item's at o's version or below (retracted first), nil for anything else (refused).
local function last_counter(o, id, cl, ops)
  local vid = sub(o.owner, 1, find(o.owner, ':', 1, true) - 1)
  if sub(cl, 1, #vid + 4) ~= '#' .. vid .. '#1#' then return false end
  local c = contribution(o.owner, id)
  if not c or newer(c.version, o.t) then return false end
  for _, r in ipairs(ops) do
    if r.kind ~= 'w' and COUNTER[r.ty] and r.id == id and r.owner == o.owner then return true end
  end
  return false
end

local function resolve(o, have, ops)
  local ids = held(o.key, have)
  if not ids or #ids == 0 then return nil end
  local older, newest = {}, false
  for _, id in ipairs(ids) do
    local raw = call('HGET', CLAIMS, id)
    local cl = claim_of(raw)
    if cl and cl.counter then -- a counter this change retracts, its item the only contributor
      if not last_counter(o, id, raw, ops) then return nil end
    elseif not cl or cl.owner ~= o.owner then
      return nil
    elseif newer(cl.version, o.t) then
      newest = true
    else
      older[#older + 1] = id
    end
  end
  if newest then return 'stale' end
  return 'clear', older
end

-- The check of a counter entry o of a group (README.md, "Counters"): sets o.skip (stale),
-- o.gone (a retraction that only drops the contribution), or o.sum, o.count, o.mine (what
-- to write); adds to clear the item's older entries of another type at its key; returns
-- what fails the group.
local function check_counter(o, clear, ops)
  local c = contribution(o.owner, o.id)
  o.c = c
  if o.kind == 'w' then
    o.skip = (c and newer(c.version, o.t)) or mark_above(o.owner, o.id, o.t)
  else
    o.skip = (c and newer(c.version, o.t)) or not c
  end
  if o.skip then return nil end
  local vid = sub(o.owner, 1, find(o.owner, ':', 1, true) - 1)
  local mine = '#' .. vid .. '#'
  local cl = call('HGET', CLAIMS, o.id)
  if cl and sub(cl, 1, #mine) ~= mine then
    local other = claim_of(cl)
    local own = not other.counter and other.owner == o.owner
    if o.kind ~= 'w' then -- the place is not this view's counter any more: drop the part
      o.gone = true
      return nil
    elseif not own then
      return 'claimed: ' .. other.owner
    elseif newer(other.version, o.t) then -- this item's newer entry holds the place
      o.skip = true
      return nil
    end
    o.replaced = true -- this item's older entry there: the counter takes its place
  end
  local have = call('TYPE', o.key)['ok']
  local cleared = false
  if have ~= 'none' and have ~= want[COUNTER[o.ty]] then
    if o.kind ~= 'w' then
      o.noput = true -- retracting from a place replaced outside viewkeeper: its count only
    else
      local how, ids = resolve(o, have, ops)
      if how == 'stale' then o.skip = true; return nil end
      if not how then return 'type: ' .. have end
      clear[#clear + 1] = { o.key, ids, o.owner, o.t }
      cleared = true
    end
  end
  local count, stored = 0, '0'
  if cl and not o.replaced then
    local n, total = string.match(sub(cl, #mine + 1), '^(%d+)#(%-?%d+)$')
    count, stored = tonumber(n) or 0, total or '0'
  end
  local cur, held_value = '0', nil
  if not o.noput and not cleared and not o.replaced then
    local fine
    fine, cur, held_value = pcall(current, o.ty, o.key, o.x)
    if not fine then return 'type: ' .. have end
  end
  local old, new = c and c.amount or '0', o.kind == 'w' and o.y or '0'
  o.mine = mine
  o.count = count + (o.kind == 'w' and (c and 0 or 1) or -1)
  if not cur then
    if o.kind == 'w' then return 'integer: ' .. tostring(held_value) end
    o.noput = true -- retracting from a place changed outside viewkeeper: its count only
  end
  o.stored = add(stored, add(new, neg(old)))
  if not fits(o.ty, o.stored) then return 'overflow: ' .. o.stored end
  if not o.noput then
    o.sum = add(cur, add(new, neg(old)))
    if not fits(o.ty, o.sum) then return 'overflow: ' .. o.sum end
  end
  return nil
end

local function apply_counter(o)
  local cf = '&' .. L(#o.owner) .. o.owner .. o.id
  if o.gone then
    call('HDEL', CLAIMS, cf)
    mark(o.owner, o.id, o.t)
    return
  end
  if o.replaced then mark(o.owner, o.id, o.t) end -- the item's entry the counter replaces
  if o.count <= 0 then
    if not o.noput then put(o.ty, o.key, o.x, nil) end
    call('HDEL', CLAIMS, o.id)
  else
    if not o.noput then put(o.ty, o.key, o.x, o.sum) end
    call('HSET', CLAIMS, o.id, o.mine .. o.count .. '#' .. o.stored)
  end
  if o.kind == 'w' then
    call('HSET', CLAIMS, cf, o.t .. o.y)
    call('HDEL', CLAIMS, tomb_field(o.owner, o.id))
  else
    call('HDEL', CLAIMS, cf)
    mark(o.owner, o.id, o.t)
  end
end

if op == 'E' then
  local g = tonumber(ARGV[a])
  local p = a + 1
  for _ = 1, g do
    local n = tonumber(ARGV[p])
    p = p + 1
    local ops = {}
    for j = 1, n do
      local q = p + 8 * (j - 1)
      local key = KEYS[tonumber(ARGV[q + 4])]
      local o = { kind = ARGV[q], owner = ARGV[q + 1], t = ARGV[q + 2], ty = ARGV[q + 3],
        key = key, x = ARGV[q + 5], y = ARGV[q + 6], ttl = ARGV[q + 7] }
      o.id = ident(COUNTER[o.ty] or o.ty, key, o.x)
      ops[j] = o
    end
    p = p + 8 * n
    -- the group's check, before any write: the type of every key written
    local bad, clear = nil, {}
    for j, o in ipairs(ops) do
      if COUNTER[o.ty] then
        local why = check_counter(o, clear, ops)
        if why then bad = { j, why }; break end
      elseif o.kind == 'w' then
        o.cl = claim_of(call('HGET', CLAIMS, o.id))
        if o.cl and o.cl.counter then -- a counter there: only if this item was its last
          local vid = sub(o.owner, 1, find(o.owner, ':', 1, true) - 1)
          local c = contribution(o.owner, o.id)
          if mark_above(o.owner, o.id, o.t) or (c and newer(c.version, o.t)) then
            o.stale = true -- this item's newer change left or holds the place
          else
            local last = false
            if c and sub(o.cl.counter, 1, #vid + 4) == '#' .. vid .. '#1#' then
              for _, r in ipairs(ops) do
                if r.kind ~= 'w' and COUNTER[r.ty] and r.id == o.id and r.owner == o.owner then
                  last = true
                end
              end
            end
            if not last then bad = { j, 'claimed: ' .. o.cl.counter }; break end
            o.cl = nil
          end
        end
        o.stale = o.stale or stale_write(o.owner, o.id, o.t, o.cl)
        local have = not o.stale and call('TYPE', o.key)['ok']
        if have and have ~= 'none' and have ~= want[o.ty] then
          local how, ids = resolve(o, have, ops)
          if not how then
            bad = { j, have }
            break
          elseif how == 'stale' then
            o.stale = true -- this item's newer entries hold the key
          else
            clear[#clear + 1] = { o.key, ids, o.owner, o.t }
          end
        end
      end
    end
    if not bad then -- this item's older entries of another type at a key it writes
      for _, c in ipairs(clear) do
        call('DEL', c[1])
        for _, id in ipairs(c[2]) do
          call('HDEL', CLAIMS, id)
          mark(c[3], id, c[4])
        end
      end
    end
    for j, o in ipairs(ops) do
      local code, detail = '1', false
      if bad then
        code = 'x'
        if j == bad[1] then
          detail = bad[2]
          if not find(detail, '^%l+: ') then detail = 'type: ' .. detail end
        end
      elseif COUNTER[o.ty] then
        if o.skip then
          code = '0'
          if o.kind ~= 'w' and not o.c then mark(o.owner, o.id, o.t); code = '1' end
        else
          apply_counter(o)
        end
      elseif o.kind == 'w' then
        if o.stale then
          code = '0'
        else
          local cl = claim_of(call('HGET', CLAIMS, o.id)) -- a clear above may have changed it
          local key, x, y = o.key, o.x, o.y
          local ok, err = pcall(function()
            if o.ty == 'V' then
              if o.ttl ~= '' then call('SET', key, y, 'EX', o.ttl) else call('SET', key, y) end
            elseif o.ty == 'H' then call('HSET', key, x, y)
            elseif o.ty == 'S' then call('SADD', key, x)
            else call('ZADD', key, y, x) end
          end)
          if not ok then
            local msg = message(err)
            if transient(msg) then return redis.error_reply(transient(msg)) end
            code, detail = 'x', msg
          else
            if cl and cl.owner ~= o.owner then code, detail = 'c', cl.owner end
            if not (cl and cl.owner == o.owner and cl.version == o.t) then
              call('HSET', CLAIMS, o.id, claim_text(o.owner, o.t))
            end
            call('HDEL', CLAIMS, tomb_field(o.owner, o.id)) -- at or below t: no longer needed
          end
        end
      else
        local cl = claim_of(call('HGET', CLAIMS, o.id))
        if cl and cl.owner == o.owner and newer(cl.version, o.t) then
          code = '0'
        else
          if cl and cl.owner == o.owner then
            remove(o.ty, o.key, o.x)
            call('HDEL', CLAIMS, o.id)
          end
          mark(o.owner, o.id, o.t)
        end
      end
      codes[#codes + 1] = code
      details[#details + 1] = detail
    end
  end
  return { table.concat(codes), counters, unpack(details) }
end

-- Forget pending parts of one item noted at t or below: those in `handled` (retracted at t:
-- a writer below t is stale there now; one at t is the same record, whose own F or replay
-- settles it) and those in `listed` (the record lists them now).
local function forget(pkey, item, t, handled, listed)
  local praw = call('HGET', pkey, item)
  if not praw then return end
  local keep = {}
  for _, x in ipairs(pending_of(praw)) do
    local drop = (handled[x[2]] or listed[x[2]]) and not newer(x[1], t)
    if not drop then keep[#keep + 1] = x end
  end
  if #keep == 0 then call('HDEL', pkey, item)
  elseif #keep ~= #pending_of(praw) then call('HSET', pkey, item, pending_text(keep)) end
end

-- F: write owner records (KEYS[2] owner hash, KEYS[3] pending hash). Per change: item key,
-- the version read at step O ('' for none), packed version v, the record's body, h, then h
-- pending parts the change retracted at v. Written ('1') only when the record still has the
-- version read: every entry the record replaced was retracted first. The same record there
-- already: '1' (a resent call). A record at v or above: 's' (the change lost; details: the
-- record). A record moved meanwhile below v: 'm' (details: record, pending list), the caller
-- retracts what that record adds and tries again.
if op == 'F' then
  local c = tonumber(ARGV[a])
  local p = a + 1
  for _ = 1, c do
    local item, w, v, body, h = ARGV[p], ARGV[p + 1], ARGV[p + 2], ARGV[p + 3], tonumber(ARGV[p + 4])
    local handled = {}
    for j = p + 5, p + 4 + h do handled[ARGV[j]] = true end
    p = p + 5 + h
    local rec = call('HGET', KEYS[2], item)
    local cur = rec and (version_at(rec, 1)) or ''
    local code, d1, d2 = '1', false, false
    if cur == w and newer(v, cur) then
      call('HSET', KEYS[2], item, v .. body)
      forget(KEYS[3], item, v, handled, body_parts(body))
    elseif cur == v and sub(rec, #v + 1) == body then
      code = '1'
    elseif cur ~= '' and not newer(v, cur) then
      code, d1 = 's', rec
    else
      code, d1, d2 = 'm', rec or false, call('HGET', KEYS[3], item) or false
    end
    codes[#codes + 1] = code
    details[#details + 1] = d1
    details[#details + 1] = d2
  end
  return { table.concat(codes), counters, unpack(details) }
end

-- P: forget pending parts (KEYS[3] pending hash) a stale or losing change retracted: per
-- item: item key, t, h, then h parts (forgotten when noted below t).
if op == 'P' then
  local c = tonumber(ARGV[a])
  local p = a + 1
  for _ = 1, c do
    local item, t, h = ARGV[p], ARGV[p + 1], tonumber(ARGV[p + 2])
    local handled = {}
    for j = p + 3, p + 2 + h do handled[ARGV[j]] = true end
    p = p + 3 + h
    forget(KEYS[3], item, t, handled, {})
    codes[#codes + 1] = '1'
  end
  return { table.concat(codes), counters }
end

-- S: counters set to the sum their claim keeps of their contributions (the end of a rebuild:
-- what was changed outside viewkeeper is repaired). Per counter: its type (v h z), its key's
-- index in KEYS, field or member, the view's claim prefix ('#' view id '#'). '1' repaired,
-- '0' right already, 's' left as it is (not this view's counter now, or its place holds
-- another type).
if op == 'S' then
  local m = tonumber(ARGV[a])
  local p = a + 1
  for _ = 1, m do
    local ty, key, x, mine = ARGV[p], KEYS[tonumber(ARGV[p + 1])], ARGV[p + 2], ARGV[p + 3]
    p = p + 4
    local cl = call('HGET', CLAIMS, ident(COUNTER[ty], key, x))
    local sum = cl and sub(cl, 1, #mine) == mine and string.match(sub(cl, #mine + 1), '^%d+#(%-?%d+)$')
    local code = 's'
    if sum then
      local fine, _, held_value = pcall(current, ty, key, x)
      if fine then
        code = '0'
        if held_value ~= sum then put(ty, key, x, sum); code = '1' end
      end
    end
    codes[#codes + 1] = code
  end
  return { table.concat(codes), counters }
end

-- K: forget retraction marks written before ARGV[a] (epoch seconds): the fields after it,
-- each re-read here (a mark raised since is kept).
if op == 'K' then
  local cutoff = tonumber(ARGV[a])
  for j = a + 1, #ARGV do
    local raw = call('HGET', CLAIMS, ARGV[j])
    local at = raw and tonumber(sub(raw, select(2, version_at(raw, 1))))
    if at and at < cutoff then
      call('HDEL', CLAIMS, ARGV[j])
      codes[#codes + 1] = '1'
    else
      codes[#codes + 1] = '0'
    end
  end
  return { table.concat(codes), counters }
end

return redis.error_reply('ERR viewkeeper cluster script: unknown step ' .. tostring(op))
