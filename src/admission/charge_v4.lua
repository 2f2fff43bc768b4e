-- llmgw_charge_v3: one admission step, with any settles waiting to be sent,
-- in one round trip. First gives back earlier reservations (settled calls,
-- an attempt that moved to another target) and budget refunds; then checks
-- every limit of the new charges and reserves them all, or none. Time is
-- the server's (TIME), never a replica's; a step of settles only never
-- reads it.
-- Key layout v3 (every key under one hash tag, so one Cluster slot):
--   s:<subject>  hash  r<sec>, t<sec> = requests and tokens counted in one
--                      second; R, T = their sums over the live seconds;
--                      o = the oldest second that may still hold a bucket;
--                      C = live leases; l<member> = a lease's end (ms);
--                      x = the expiry last set on the hash (ms)
--   budget:<key> hash  w = window index, tok = tokens, usd = nano-USD
-- v2 kept leases in a sorted set beside the rate hash: three more calls
-- per subject per admission (ZCARD, ZADD, PTTL). In one hash, a subject
-- costs one HMGET and one HSET to check and reserve; its lease count is a
-- field, recounted from the leases only when the subject is full. A change
-- of layout is a new script name and new key names, so old and new
-- replicas run side by side during a rolling update (each counting its own
-- keys).
--
-- KEYS: per release: subject; per budget refund: the budget key; per
--       charge: subject; then the budget key of the charge, when there is
--       one (the order they are used in).
-- ARGV: member, lease_ms, #releases, #charges, #refunds, budget charge
--       (0/1), then per release: member, at_sec, refund_tokens (negative:
--       charge more), lease (0/1); per refund: window, tokens, nano_usd;
--       per charge: rpm, tpm, concurrency (-1: none), tokens; the budget
--       charge: window_secs, limit_tokens, limit_nano_usd (-1: none),
--       tokens, nano_usd.
-- Returns {1, now_sec (0 with no charge), budget_tokens, budget_nano_usd,
-- window} (-1 where no budget), or {0, charge index (0: the budget), code,
-- retry_after_ms (-1: unknown), never (1: cannot fit even when idle)};
-- code 1 rpm, 2 tpm, 3 concurrency, 4 budget tokens, 5 budget usd. Either
-- is followed by tokens, nano_usd, window per refund (window -1: it had
-- moved on, nothing was refunded).

local WINDOW = 60
local member = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local nrel = tonumber(ARGV[3])
local nchg = tonumber(ARGV[4])
local nref = tonumber(ARGV[5])
local bcharge = ARGV[6] == '1'
local a = 7
local k = 1

local function int(x)
  return string.format('%d', x)
end

-- Releases: a bucket that is gone aged out of the window (its tokens left
-- the sums with it), so nothing comes off for it; one still there comes
-- off the sums even when it is past the window and not yet dropped, so
-- dropping it later takes off only what it still holds.
for _ = 1, nrel do
  local s = KEYS[k]
  k = k + 1
  local m, at, refund, lease = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1'
  a = a + 4
  local tf, lf = 't' .. at, 'l' .. m
  local v = redis.call('HMGET', s, tf, 'T', 'C', lf)
  local set, del = {}, {}
  local held = tonumber(v[1])
  if refund ~= 0 and held then
    local given = refund
    if held - refund <= 0 then
      given = held
      del[#del + 1] = tf
    else
      set[#set + 1] = tf
      set[#set + 1] = int(held - refund)
    end
    set[#set + 1] = 'T'
    set[#set + 1] = int(math.max(0, (tonumber(v[2]) or 0) - given))
  end
  if lease and v[4] then
    del[#del + 1] = lf
    set[#set + 1] = 'C'
    set[#set + 1] = int(math.max(0, (tonumber(v[3]) or 1) - 1))
  end
  if #set > 0 then
    redis.call('HSET', s, unpack(set))
  end
  if #del > 0 then
    redis.call('HDEL', s, unpack(del))
  end
end

local refunds = {}
for i = 1, nref do
  local bkey = KEYS[k]
  k = k + 1
  local win, tok, usd = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local cur = redis.call('HMGET', bkey, 'w', 'tok', 'usd')
  local r = { -1, -1, -1 }
  if tonumber(cur[1]) == tonumber(win) then
    r = { math.max(0, (tonumber(cur[2]) or 0) - tok), math.max(0, (tonumber(cur[3]) or 0) - usd), tonumber(win) }
    redis.call('HSET', bkey, 'tok', int(r[1]), 'usd', int(r[2]))
  end
  refunds[i] = r
end

local function reply(head)
  for _, r in ipairs(refunds) do
    head[#head + 1] = r[1]
    head[#head + 1] = r[2]
    head[#head + 1] = r[3]
  end
  return head
end

if nchg == 0 and not bcharge then
  return reply({ 1, 0, -1, -1, -1 })
end

local t = redis.call('TIME')
local now_sec = tonumber(t[1])
local now_us = now_sec * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)
local rnow, tnow = 'r' .. t[1], 't' .. t[1]

-- Every live bucket of a subject, by second: only for a refusal's retry
-- time, so the common path never reads them all.
local function buckets(s)
  local all = redis.call('HGETALL', s)
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

-- Drops the seconds of `w` that aged out since the last check, taking them
-- off the sums (and writing the sums with the drop: one without the other
-- would count them twice). After a clock jump (a failover to a server whose
-- clock differs) that would mean too many seconds, it counts every bucket
-- again instead.
local function age(s, w)
  local cutoff = now_sec - WINDOW
  if not w.oldest or w.oldest >= cutoff then
    return
  end
  local stale = {}
  if cutoff - w.oldest <= 2 * (WINDOW + 2) then
    for sec = w.oldest, cutoff - 1 do
      stale[#stale + 1] = 'r' .. int(sec)
      stale[#stale + 1] = 't' .. int(sec)
    end
    local old = redis.call('HMGET', s, unpack(stale))
    for i = 1, #stale, 2 do
      w.req = w.req - (tonumber(old[i]) or 0)
      w.tok = w.tok - (tonumber(old[i + 1]) or 0)
    end
  else
    w.req, w.tok = 0, 0
    local all = redis.call('HGETALL', s)
    for i = 1, #all, 2 do
      local field = all[i]
      local kind = string.sub(field, 1, 1)
      local sec = tonumber(string.sub(field, 2))
      if (kind == 'r' or kind == 't') and sec then
        if sec < cutoff then
          stale[#stale + 1] = field
        elseif kind == 'r' then
          w.req = w.req + (tonumber(all[i + 1]) or 0)
        else
          w.tok = w.tok + (tonumber(all[i + 1]) or 0)
        end
      end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', s, unpack(stale))
  end
  w.req, w.tok, w.oldest = math.max(0, w.req), math.max(0, w.tok), cutoff
  redis.call('HSET', s, 'R', int(w.req), 'T', int(w.tok), 'o', int(cutoff))
end

-- Leases that ran out (a replica that died holding them) are dropped, and
-- the count is made from the leases that are left.
local function purge(s, w)
  local all = redis.call('HGETALL', s)
  local dead, live = {}, 0
  for i = 1, #all, 2 do
    local field = all[i]
    if string.sub(field, 1, 1) == 'l' then
      if (tonumber(all[i + 1]) or 0) <= now_ms then
        dead[#dead + 1] = field
      else
        live = live + 1
      end
    end
  end
  if #dead > 0 then
    redis.call('HDEL', s, unpack(dead))
  end
  w.leases = live
  redis.call('HSET', s, 'C', int(live))
end

-- The state of a subject: its sums over the window, this second's
-- buckets, its live leases and whether this ticket holds one, in one call.
local function state(s, rate, cc)
  local v = redis.call('HMGET', s, 'x', 'R', 'T', 'o', rnow, tnow, 'C', 'l' .. member)
  local w = {
    expiry = tonumber(v[1]),
    req = tonumber(v[2]) or 0, tok = tonumber(v[3]) or 0, oldest = tonumber(v[4]),
    cur_req = tonumber(v[5]) or 0, cur_tok = tonumber(v[6]) or 0,
    leases = tonumber(v[7]) or 0, holding = v[8] ~= false,
  }
  if rate then
    age(s, w)
  end
  return w
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

local charges, seen = {}, {}
for i = 1, nchg do
  local c = {
    s = KEYS[k],
    rpm = tonumber(ARGV[a]), tpm = tonumber(ARGV[a + 1]),
    cc = tonumber(ARGV[a + 2]), tokens = tonumber(ARGV[a + 3]),
  }
  k = k + 1
  a = a + 4
  c.rate = c.rpm >= 0 or c.tpm >= 0
  charges[i] = c
  -- One state per subject, should one be charged twice in a step.
  c.w = seen[c.s] or state(c.s, c.rate, c.cc >= 0)
  seen[c.s] = c.w
  local w = c.w
  if c.rpm >= 0 and w.req + 1 > c.rpm then
    return reply({ 0, i, 1, retry_ms(buckets(c.s), 1, w.req + 1 - c.rpm), 0 })
  end
  if c.tpm >= 0 then
    if c.tokens > c.tpm then
      return reply({ 0, i, 2, -1, 1 })
    end
    if w.tok + c.tokens > c.tpm then
      return reply({ 0, i, 2, retry_ms(buckets(c.s), 2, w.tok + c.tokens - c.tpm), 0 })
    end
  end
  -- A ticket already holding its slot (charged again) never counts twice.
  if c.cc >= 0 and not w.holding and w.leases >= c.cc then
    purge(c.s, w)
    if w.leases >= c.cc then
      return reply({ 0, i, 3, -1, 0 })
    end
  end
end

local bkey = KEYS[k]
local btok, busd, bwin = -1, -1, -1
if bcharge then
  local wsecs, ltok, lusd = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local tok, usd = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  bwin = math.floor(now_sec / wsecs)
  local cur = redis.call('HMGET', bkey, 'w', 'tok', 'usd')
  btok, busd = 0, 0
  if tonumber(cur[1]) == bwin then
    btok, busd = tonumber(cur[2]) or 0, tonumber(cur[3]) or 0
  else
    redis.call('DEL', bkey)
  end
  local until_end = math.ceil(((bwin + 1) * wsecs * 1000000 - now_us) / 1000)
  if ltok >= 0 then
    if tok > ltok then
      return reply({ 0, 0, 4, -1, 1 })
    end
    if btok + tok > ltok then
      return reply({ 0, 0, 4, until_end, 0 })
    end
  end
  if lusd >= 0 then
    if usd > lusd then
      return reply({ 0, 0, 5, -1, 1 })
    end
    if busd + usd > lusd or busd >= lusd then
      return reply({ 0, 0, 5, until_end, 0 })
    end
  end
  btok, busd = btok + tok, busd + usd
  redis.call('HSET', bkey, 'w', int(bwin), 'tok', int(btok), 'usd', int(busd))
  if tonumber(cur[1]) ~= bwin then
    redis.call('PEXPIREAT', bkey, int(((bwin + 1) * wsecs + 3600) * 1000))
  end
end

for _, c in ipairs(charges) do
  -- Every field read in `state` is written back in one call: nothing else
  -- runs between them (a script is atomic).
  local w = c.w
  local fields = {}
  if c.rpm >= 0 then
    w.cur_req, w.req = w.cur_req + 1, w.req + 1
    fields = { rnow, int(w.cur_req), 'R', int(w.req) }
  end
  if c.tpm >= 0 then
    w.cur_tok, w.tok = w.cur_tok + c.tokens, w.tok + c.tokens
    fields[#fields + 1] = tnow
    fields[#fields + 1] = int(w.cur_tok)
    fields[#fields + 1] = 'T'
    fields[#fields + 1] = int(w.tok)
  end
  if c.rate and not w.oldest then
    w.oldest = now_sec
    fields[#fields + 1] = 'o'
    fields[#fields + 1] = t[1]
  end
  -- The hash outlives its newest bucket by the window and its longest
  -- lease; the expiry is moved (about once a second) only when that is
  -- later than the one set.
  local keep = c.rate and (WINDOW + 3) * 1000 or 0
  if c.cc >= 0 then
    if not w.holding then
      w.leases, w.holding = w.leases + 1, true
      fields[#fields + 1] = 'C'
      fields[#fields + 1] = int(w.leases)
    end
    fields[#fields + 1] = 'l' .. member
    fields[#fields + 1] = int(now_ms + lease_ms)
    keep = math.max(keep, lease_ms + 2000)
  end
  local want = now_ms + keep
  local extend = not w.expiry or want > w.expiry + 1000
  if extend then
    w.expiry = want
    fields[#fields + 1] = 'x'
    fields[#fields + 1] = int(want)
  end
  redis.call('HSET', c.s, unpack(fields))
  if extend then
    redis.call('PEXPIREAT', c.s, int(want))
  end
end

return reply({ 1, now_sec, btok, busd, bwin })
