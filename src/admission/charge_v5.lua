-- llmgw_charge_v5: one admission step of several tickets, with any settles
-- waiting to be sent, in one round trip. First gives back earlier
-- reservations (settled calls, an attempt that moved to another target)
-- and budget refunds; then, ticket by ticket, checks every limit of its
-- charges and reserves them all, or none (a later ticket sees what an
-- earlier one reserved). Time is the server's (TIME), never a replica's;
-- a step of settles only never reads it.
-- v5 adds blocks: a ticket may reserve `units` calls at once (one request
-- each, its tokens the block's total, `units` leases under one member), and
-- a release gives back any number of a member's leases and requests. A
-- replica admits ahead from blocks under limits far from full, so a block's
-- calls cost Redis one ticket, and their settles one release per block and
-- step.
-- Key layout (v3's, plus n<member>: v3, v4 and v5 replicas share their
-- counts during a rolling update, except that v3 and v4 count a block's
-- leases as one when they purge; every key under one hash tag, so one
-- Cluster slot):
--   s:<subject>  hash  r<sec>, t<sec> = requests and tokens counted in one
--                      second; R, T = their sums over the live seconds;
--                      o = the oldest second that may still hold a bucket;
--                      C = live leases; l<member> = a lease's end (ms);
--                      n<member> = its leases when more than one;
--                      x = the expiry last set on the hash (ms)
--   budget:<key> hash  w = window index, tok = tokens, usd = nano-USD
-- v3 read and wrote a subject once per release and once per charge. Here
-- each subject of the step is read once (one HMGET of every field the step
-- needs), changed in the script's memory, and written once at the end (one
-- HSET, one HDEL): with the tickets of a busy second sharing their key and
-- target, a step of eight tickets costs about what one did.
--
-- KEYS: per release: subject; per budget refund: the budget key; then per
--       ticket: per charge: subject; its budget key, when it charges one
--       (the order they are used in).
-- ARGV: #releases, #refunds, #tickets, then per release: member, at_sec,
--       refund_tokens (negative: charge more), leases (how many to give
--       back; 0: none), requests (how many to take off the second's count:
--       a block's calls never taken); per refund: window, tokens,
--       nano_usd; per ticket: member, lease_ms, units (calls reserved,
--       >= 1), #charges, budget charge (0/1), then per charge: rpm, tpm,
--       concurrency (-1: none), tokens (the ticket's total); then the
--       budget charge: window_secs, limit_tokens, limit_nano_usd (-1:
--       none), tokens, nano_usd.
-- Returns, per ticket, {1, now_sec (0 with no charge), budget_tokens,
-- budget_nano_usd, window} (-1 where no budget), or {0, charge index
-- (0: the budget), code, retry_after_ms (-1: unknown), never (1: cannot
-- fit even when idle)}; code 1 rpm, 2 tpm, 3 concurrency, 4 budget
-- tokens, 5 budget usd. Then tokens, nano_usd, window per refund (window
-- -1: it had moved on, nothing was refunded).

local WINDOW = 60
local nrel, nref, ntix = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local a, k = 4, 1

local function int(x)
  return string.format('%d', x)
end

-- Every subject the step touches: `v` its fields as numbers (false: not
-- there), `dirty` the fields to write back, `need` the fields to read.
local subjects, order = {}, {}
local function subject(s)
  local S = subjects[s]
  if not S then
    S = { key = s, v = {}, dirty = {}, need = {}, nneed = 0 }
    subjects[s] = S
    order[#order + 1] = S
  end
  return S
end
local function want(S, field)
  if not S.need[field] then
    S.need[field] = true
    S.nneed = S.nneed + 1
    S.need[S.nneed] = field
  end
end
local function get(S, field)
  local x = S.v[field]
  if x == nil then
    x = tonumber(redis.call('HGET', S.key, field)) or false
    S.v[field] = x
  end
  return x or nil
end
local function put(S, field, x)
  S.v[field] = x
  S.dirty[field] = true
end
-- Writes what changed: before a read of the whole hash, and at the end.
local function flush(S)
  local set, del = {}, {}
  for field in pairs(S.dirty) do
    local x = S.v[field]
    if x then
      set[#set + 1] = field
      set[#set + 1] = int(x)
    else
      del[#del + 1] = field
    end
  end
  S.dirty = {}
  if #set > 0 then
    redis.call('HSET', S.key, unpack(set))
  end
  if #del > 0 then
    redis.call('HDEL', S.key, unpack(del))
  end
end

-- The budget keys of the step, read once and written once the same way.
local budgets, border = {}, {}
local function budget(key)
  local B = budgets[key]
  if not B then
    local cur = redis.call('HMGET', key, 'w', 'tok', 'usd')
    B = { key = key, w = tonumber(cur[1]), tok = tonumber(cur[2]) or 0, usd = tonumber(cur[3]) or 0 }
    budgets[key] = B
    border[#border + 1] = B
  end
  return B
end

local rels = {}
for i = 1, nrel do
  local r = {
    S = subject(KEYS[k]), m = ARGV[a], at = ARGV[a + 1], refund = tonumber(ARGV[a + 2]),
    leases = tonumber(ARGV[a + 3]), requests = tonumber(ARGV[a + 4]),
  }
  k, a = k + 1, a + 5
  r.tf, r.rf, r.lf, r.nf = 't' .. r.at, 'r' .. r.at, 'l' .. r.m, 'n' .. r.m
  if r.requests > 0 then
    want(r.S, r.rf)
    want(r.S, 'R')
  end
  want(r.S, r.tf)
  want(r.S, 'T')
  want(r.S, 'C')
  want(r.S, r.lf)
  if r.leases > 0 then
    want(r.S, r.nf)
  end
  rels[i] = r
end
local refs = {}
for i = 1, nref do
  refs[i] = { key = KEYS[k], win = tonumber(ARGV[a]), tok = tonumber(ARGV[a + 1]), usd = tonumber(ARGV[a + 2]) }
  k, a = k + 1, a + 3
end
local tix, charging = {}, false
for i = 1, ntix do
  local t = {
    m = ARGV[a], lease_ms = tonumber(ARGV[a + 1]), units = math.max(1, tonumber(ARGV[a + 2])),
    n = tonumber(ARGV[a + 3]), bcharge = ARGV[a + 4] == '1', ch = {},
  }
  a = a + 5
  t.lf, t.nf = 'l' .. t.m, 'n' .. t.m
  for j = 1, t.n do
    local c = {
      S = subject(KEYS[k]),
      rpm = tonumber(ARGV[a]), tpm = tonumber(ARGV[a + 1]),
      cc = tonumber(ARGV[a + 2]), tokens = tonumber(ARGV[a + 3]),
    }
    k, a = k + 1, a + 4
    c.rate = c.rpm >= 0 or c.tpm >= 0
    t.ch[j] = c
    want(c.S, t.lf)
  end
  if t.bcharge then
    t.b = {
      key = KEYS[k], wsecs = tonumber(ARGV[a]), ltok = tonumber(ARGV[a + 1]),
      lusd = tonumber(ARGV[a + 2]), tok = tonumber(ARGV[a + 3]), usd = tonumber(ARGV[a + 4]),
    }
    k, a = k + 1, a + 5
  end
  charging = charging or t.n > 0 or t.bcharge
  tix[i] = t
end

local t, now_sec, now_us, now_ms, rnow, tnow
if charging then
  t = redis.call('TIME')
  now_sec = tonumber(t[1])
  now_us = now_sec * 1000000 + tonumber(t[2])
  now_ms = math.floor(now_us / 1000)
  rnow, tnow = 'r' .. t[1], 't' .. t[1]
  for _, tk in ipairs(tix) do
    for _, c in ipairs(tk.ch) do
      for _, f in ipairs({ 'x', 'R', 'T', 'o', rnow, tnow, 'C' }) do
        want(c.S, f)
      end
    end
  end
end

-- One read per subject, of every field the step needs.
for _, S in ipairs(order) do
  if S.nneed > 0 then
    local fields = {}
    for i = 1, S.nneed do
      fields[i] = S.need[i]
    end
    local v = redis.call('HMGET', S.key, unpack(fields))
    for i = 1, S.nneed do
      S.v[fields[i]] = tonumber(v[i]) or false
    end
  end
end

-- Releases: a bucket that is gone aged out of the window (its tokens left
-- the sums with it), so nothing comes off for it; one still there comes
-- off the sums even when it is past the window and not yet dropped, so
-- dropping it later takes off only what it still holds.
for _, r in ipairs(rels) do
  local S = r.S
  local held = get(S, r.tf)
  if r.refund ~= 0 and held then
    local given = r.refund
    if held - r.refund <= 0 then
      given = held
      put(S, r.tf, false)
    else
      put(S, r.tf, held - r.refund)
    end
    put(S, 'T', math.max(0, (get(S, 'T') or 0) - given))
  end
  local reqs = r.requests > 0 and get(S, r.rf)
  if reqs then
    local given = math.min(r.requests, reqs)
    put(S, r.rf, reqs - given > 0 and reqs - given or false)
    put(S, 'R', math.max(0, (get(S, 'R') or 0) - given))
  end
  if r.leases > 0 and get(S, r.lf) then
    local held = get(S, r.nf) or 1
    local given = math.min(r.leases, held)
    if held - given <= 0 then
      put(S, r.lf, false)
      if get(S, r.nf) then
        put(S, r.nf, false)
      end
    else
      put(S, r.nf, held - given)
    end
    put(S, 'C', math.max(0, (get(S, 'C') or given) - given))
  end
end

local refunds = {}
for i, r in ipairs(refs) do
  local B = budget(r.key)
  local out = { -1, -1, -1 }
  if B.w == r.win then
    B.tok, B.usd = math.max(0, B.tok - r.tok), math.max(0, B.usd - r.usd)
    B.dirty = true
    out = { B.tok, B.usd, r.win }
  end
  refunds[i] = out
end

local function finish(heads)
  for _, S in ipairs(order) do
    flush(S)
    if S.expire then
      redis.call('PEXPIREAT', S.key, int(S.expire))
    end
  end
  for _, B in ipairs(border) do
    if B.cleared and not B.dirty then
      redis.call('DEL', B.key)
    elseif B.dirty then
      redis.call('HSET', B.key, 'w', int(B.w), 'tok', int(B.tok), 'usd', int(B.usd))
      if B.cleared then
        redis.call('PEXPIREAT', B.key, int(((B.w + 1) * B.wsecs + 3600) * 1000))
      end
    end
  end
  for _, r in ipairs(refunds) do
    heads[#heads + 1] = r[1]
    heads[#heads + 1] = r[2]
    heads[#heads + 1] = r[3]
  end
  return heads
end

if not charging then
  local heads = {}
  for _ = 1, ntix do
    for _, x in ipairs({ 1, 0, -1, -1, -1 }) do
      heads[#heads + 1] = x
    end
  end
  return finish(heads)
end

-- Every live bucket of a subject, by second: only for a refusal's retry
-- time, so the common path never reads them all.
local function buckets(S)
  flush(S)
  local all = redis.call('HGETALL', S.key)
  local by_sec = {}
  for i = 1, #all, 2 do
    local field = all[i]
    local kind = string.sub(field, 1, 1)
    if kind == 'r' or kind == 't' then
      local sec = tonumber(string.sub(field, 2))
      if sec and sec >= now_sec - WINDOW then
        local b = by_sec[sec]
        if not b then
          b = { 0, 0 }
          by_sec[sec] = b
        end
        b[kind == 'r' and 1 or 2] = tonumber(all[i + 1]) or 0
      end
    end
  end
  return by_sec
end

-- Drops the seconds that aged out since the last check, taking them off
-- the sums. After a clock jump (a failover to a server whose clock
-- differs) that would mean too many seconds, it counts every bucket again
-- instead.
local function age(S)
  local cutoff = now_sec - WINDOW
  local oldest = get(S, 'o')
  if not oldest or oldest >= cutoff then
    return
  end
  local req, tok = get(S, 'R') or 0, get(S, 'T') or 0
  if cutoff - oldest <= 2 * (WINDOW + 2) then
    local stale = {}
    for sec = oldest, cutoff - 1 do
      stale[#stale + 1] = 'r' .. int(sec)
      stale[#stale + 1] = 't' .. int(sec)
    end
    -- Read through the step's own changes (a release may have emptied one).
    local unread = {}
    for _, f in ipairs(stale) do
      if S.v[f] == nil then
        unread[#unread + 1] = f
      end
    end
    if #unread > 0 then
      local old = redis.call('HMGET', S.key, unpack(unread))
      for i, f in ipairs(unread) do
        S.v[f] = tonumber(old[i]) or false
      end
    end
    for i = 1, #stale, 2 do
      req = req - (S.v[stale[i]] or 0)
      tok = tok - (S.v[stale[i + 1]] or 0)
      if S.v[stale[i]] then
        put(S, stale[i], false)
      end
      if S.v[stale[i + 1]] then
        put(S, stale[i + 1], false)
      end
    end
  else
    flush(S)
    req, tok = 0, 0
    local all = redis.call('HGETALL', S.key)
    for i = 1, #all, 2 do
      local field = all[i]
      local kind = string.sub(field, 1, 1)
      local sec = tonumber(string.sub(field, 2))
      if (kind == 'r' or kind == 't') and sec then
        if sec < cutoff then
          put(S, field, false)
        elseif kind == 'r' then
          req = req + (tonumber(all[i + 1]) or 0)
        else
          tok = tok + (tonumber(all[i + 1]) or 0)
        end
      end
    end
  end
  put(S, 'R', math.max(0, req))
  put(S, 'T', math.max(0, tok))
  put(S, 'o', cutoff)
end

-- Leases that ran out (a replica that died holding them) are dropped, and
-- the count is made from the leases that are left.
local function purge(S)
  flush(S)
  local all = redis.call('HGETALL', S.key)
  local counts, alive = {}, {}
  for i = 1, #all, 2 do
    local field = all[i]
    local kind = string.sub(field, 1, 1)
    if kind == 'l' then
      local m = string.sub(field, 2)
      if (tonumber(all[i + 1]) or 0) <= now_ms then
        put(S, field, false)
        put(S, 'n' .. m, false)
      else
        alive[#alive + 1] = m
      end
    elseif kind == 'n' then
      counts[string.sub(field, 2)] = tonumber(all[i + 1])
    end
  end
  local live = 0
  for _, m in ipairs(alive) do
    live = live + (counts[m] or 1)
  end
  put(S, 'C', live)
end

-- When enough buckets age out to free `need` (a bucket counts for 61 s).
local function retry_ms(by_sec, which, need)
  local freed = 0
  for sec = now_sec - WINDOW, now_sec do
    local b = by_sec[sec]
    if b then
      freed = freed + b[which]
      if freed >= need then
        return math.max(0, math.ceil(((sec + WINDOW + 1) * 1000000 - now_us) / 1000))
      end
    end
  end
  return -1
end

for _, S in ipairs(order) do
  S.aged = false
end

-- A ticket's verdict: nil when every charge fits, else its refusal.
local function check(tk)
  for i, c in ipairs(tk.ch) do
    local S = c.S
    if c.rate and not S.aged then
      S.aged = true
      age(S)
    end
    local req, tok = get(S, 'R') or 0, get(S, 'T') or 0
    if c.rpm >= 0 and req + tk.units > c.rpm then
      if tk.units > c.rpm then
        return { 0, i, 1, -1, 1 }
      end
      return { 0, i, 1, retry_ms(buckets(S), 1, req + tk.units - c.rpm), 0 }
    end
    if c.tpm >= 0 then
      if c.tokens > c.tpm then
        return { 0, i, 2, -1, 1 }
      end
      if tok + c.tokens > c.tpm then
        return { 0, i, 2, retry_ms(buckets(S), 2, tok + c.tokens - c.tpm), 0 }
      end
    end
    -- A ticket already holding its slot (charged again) never counts twice.
    if c.cc >= 0 and not get(S, tk.lf) and (get(S, 'C') or 0) + tk.units > c.cc then
      purge(S)
      if (get(S, 'C') or 0) + tk.units > c.cc then
        return { 0, i, 3, -1, 0 }
      end
    end
  end
  local b = tk.b
  if b then
    local B = budget(b.key)
    local bwin = math.floor(now_sec / b.wsecs)
    if B.w ~= bwin then
      -- A new window: what the old one spent is gone.
      B.w, B.tok, B.usd, B.wsecs, B.cleared = bwin, 0, 0, b.wsecs, true
    end
    local until_end = math.ceil(((bwin + 1) * b.wsecs * 1000000 - now_us) / 1000)
    if b.ltok >= 0 then
      if b.tok > b.ltok then
        return { 0, 0, 4, -1, 1 }
      end
      if B.tok + b.tok > b.ltok then
        return { 0, 0, 4, until_end, 0 }
      end
    end
    if b.lusd >= 0 then
      if b.usd > b.lusd then
        return { 0, 0, 5, -1, 1 }
      end
      if B.usd + b.usd > b.lusd or B.usd >= b.lusd then
        return { 0, 0, 5, until_end, 0 }
      end
    end
  end
  return nil
end

local function reserve(tk)
  for _, c in ipairs(tk.ch) do
    local S = c.S
    if c.rpm >= 0 then
      put(S, rnow, (get(S, rnow) or 0) + tk.units)
      put(S, 'R', (get(S, 'R') or 0) + tk.units)
    end
    if c.tpm >= 0 then
      put(S, tnow, (get(S, tnow) or 0) + c.tokens)
      put(S, 'T', (get(S, 'T') or 0) + c.tokens)
    end
    if c.rate and not get(S, 'o') then
      put(S, 'o', now_sec)
    end
    -- The hash outlives its newest bucket by the window and its longest
    -- lease; the expiry is moved (about once a second) only when that is
    -- later than the one set.
    local keep = c.rate and (WINDOW + 3) * 1000 or 0
    if c.cc >= 0 then
      if not get(S, tk.lf) then
        put(S, 'C', (get(S, 'C') or 0) + tk.units)
        if tk.units > 1 then
          put(S, tk.nf, tk.units)
        end
      end
      put(S, tk.lf, now_ms + tk.lease_ms)
      keep = math.max(keep, tk.lease_ms + 2000)
    end
    local until_ms = now_ms + keep
    local set = get(S, 'x')
    if not set or until_ms > set + 1000 then
      put(S, 'x', until_ms)
      S.expire = until_ms
    end
  end
  local b = tk.b
  if b then
    local B = budget(b.key)
    B.tok, B.usd, B.dirty = B.tok + b.tok, B.usd + b.usd, true
    return { 1, now_sec, B.tok, B.usd, B.w }
  end
  return { 1, now_sec, -1, -1, -1 }
end

local heads = {}
for _, tk in ipairs(tix) do
  local verdict = check(tk) or reserve(tk)
  for _, x in ipairs(verdict) do
    heads[#heads + 1] = x
  end
end
return finish(heads)
