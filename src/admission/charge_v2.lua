-- llmgw_charge_v2: one admission or one settle, in one round trip.
-- First gives back earlier reservations (a settled call, an attempt that
-- moved to another target), then checks every limit of the new charges and
-- reserves them all, or none. Time is the server's (TIME), never a replica's.
-- Key layout v2 (every key under one hash tag, so one Cluster slot):
--   rate:<subject>  hash  r<sec> = requests, t<sec> = tokens, one-second
--                         buckets; R, T = their sums over the live buckets;
--                         o = the oldest second that may still hold a bucket
--   conc:<subject>  zset  member = ticket id, score = lease end (ms)
--   budget:<key>    hash  w = window index, tok = tokens, usd = nano-USD
-- v1 read every bucket of a rate hash (HGETALL, up to 122 fields) on every
-- check; v2 keeps running sums and drops only the seconds that aged out
-- since the last check, so a check costs a few field reads. A change of
-- layout is a new script name and new key names, so old and new replicas
-- run side by side during a rolling update (each counting its own keys).
--
-- KEYS: per release: rate, conc; per charge: rate, conc; then the budget key
--       when there is a budget operation.
-- ARGV: member, lease_ms, #releases, #charges, budget_op (0 none, 1 charge,
--       2 refund), then per release: at_sec, refund_tokens, lease (0/1);
--       per charge: rpm, tpm, concurrency (-1: none), tokens;
--       budget charge: window_secs, limit_tokens, limit_nano_usd (-1: none),
--       tokens, nano_usd; budget refund: window, tokens, nano_usd.
-- Returns {1, now_sec, budget_tokens, budget_nano_usd, window} (-1 where no
-- budget), or {0, charge index (0: the budget), code, retry_after_ms (-1:
-- unknown), never (1: cannot fit even when idle)}; code 1 rpm, 2 tpm,
-- 3 concurrency, 4 budget tokens, 5 budget usd.

local WINDOW = 60
local t = redis.call('TIME')
local now_sec = tonumber(t[1])
local now_us = now_sec * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

local member = ARGV[1]
local lease_ms = tonumber(ARGV[2])
local nrel = tonumber(ARGV[3])
local nchg = tonumber(ARGV[4])
local bop = tonumber(ARGV[5])
local a = 6
local k = 1

local function int(x)
  return string.format('%d', x)
end

for _ = 1, nrel do
  local rate, conc = KEYS[k], KEYS[k + 1]
  k = k + 2
  local at, refund, lease = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  if refund ~= 0 and at >= now_sec - WINDOW then
    local field = 't' .. int(at)
    local left = redis.call('HINCRBY', rate, field, int(-refund))
    local given = refund
    if left <= 0 then
      -- The bucket held less than the refund (or nothing: it aged out, and
      -- HINCRBY made it): only what it held comes off the sum.
      given = math.max(0, refund + left)
      redis.call('HDEL', rate, field)
    end
    if given > 0 and redis.call('HINCRBY', rate, 'T', int(-given)) < 0 then
      redis.call('HSET', rate, 'T', 0)
    end
  end
  if lease == 1 then
    redis.call('ZREM', conc, member)
  end
end

-- Every live bucket of a rate hash, by second: only for a refusal's retry
-- time, so the common path never reads them all.
local function buckets(rate)
  local all = redis.call('HGETALL', rate)
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

-- The state of a rate hash over the window: its request and token sums and
-- this second's buckets, read in one call. Drops the seconds that aged out
-- since the last check, taking them off the sums; after a clock jump (a
-- failover to a server whose clock differs) that would mean too many
-- seconds, it counts every bucket again instead.
local function window(rate)
  local v = redis.call('HMGET', rate, 'R', 'T', 'o', 'r' .. int(now_sec), 't' .. int(now_sec))
  local w = {
    req = tonumber(v[1]) or 0, tok = tonumber(v[2]) or 0, oldest = tonumber(v[3]),
    cur_req = tonumber(v[4]) or 0, cur_tok = tonumber(v[5]) or 0,
  }
  local cutoff = now_sec - WINDOW
  if not w.oldest or w.oldest >= cutoff then
    return w
  end
  local stale = {}
  if cutoff - w.oldest <= 2 * (WINDOW + 2) then
    for s = w.oldest, cutoff - 1 do
      stale[#stale + 1] = 'r' .. int(s)
      stale[#stale + 1] = 't' .. int(s)
    end
    local old = redis.call('HMGET', rate, unpack(stale))
    for i = 1, #stale, 2 do
      w.req = w.req - (tonumber(old[i]) or 0)
      w.tok = w.tok - (tonumber(old[i + 1]) or 0)
    end
  else
    w.req, w.tok = 0, 0
    local all = redis.call('HGETALL', rate)
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
    redis.call('HDEL', rate, unpack(stale))
  end
  w.req, w.tok, w.oldest = math.max(0, w.req), math.max(0, w.tok), cutoff
  redis.call('HSET', rate, 'R', int(w.req), 'T', int(w.tok), 'o', int(cutoff))
  return w
end

-- When enough buckets age out to free `need` (a bucket counts for 61 s).
local function retry_ms(buckets, which, need)
  local freed = 0
  for s = now_sec - WINDOW, now_sec do
    local b = buckets[s]
    if b then
      freed = freed + b[which]
      if freed >= need then
        return math.max(0, math.ceil(((s + WINDOW + 1) * 1000000 - now_us) / 1000))
      end
    end
  end
  return -1
end

local charges, seen = {}, {}
for i = 1, nchg do
  local c = {
    rate = KEYS[k], conc = KEYS[k + 1],
    rpm = tonumber(ARGV[a]), tpm = tonumber(ARGV[a + 1]),
    cc = tonumber(ARGV[a + 2]), tokens = tonumber(ARGV[a + 3]),
  }
  k = k + 2
  a = a + 4
  charges[i] = c
  if c.rpm >= 0 or c.tpm >= 0 then
    -- One state per hash, should one subject be charged twice in a step.
    c.w = seen[c.rate] or window(c.rate)
    seen[c.rate] = c.w
    local req, tok = c.w.req, c.w.tok
    if c.rpm >= 0 and req + 1 > c.rpm then
      return { 0, i, 1, retry_ms(buckets(c.rate), 1, req + 1 - c.rpm), 0 }
    end
    if c.tpm >= 0 then
      if c.tokens > c.tpm then
        return { 0, i, 2, -1, 1 }
      end
      if tok + c.tokens > c.tpm then
        return { 0, i, 2, retry_ms(buckets(c.rate), 2, tok + c.tokens - c.tpm), 0 }
      end
    end
  end
  -- Leases that ran out (a replica that died holding them) are purged only
  -- when they could stand in the way; a ticket already holding its slot
  -- (charged again) never counts twice.
  if c.cc >= 0 and redis.call('ZCARD', c.conc) >= c.cc then
    redis.call('ZREMRANGEBYSCORE', c.conc, '-inf', now_ms)
    if redis.call('ZCARD', c.conc) >= c.cc and not redis.call('ZSCORE', c.conc, member) then
      return { 0, i, 3, -1, 0 }
    end
  end
end

local bkey = KEYS[k]
local btok, busd, bwin = -1, -1, -1
if bop == 1 then
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
      return { 0, 0, 4, -1, 1 }
    end
    if btok + tok > ltok then
      return { 0, 0, 4, until_end, 0 }
    end
  end
  if lusd >= 0 then
    if usd > lusd then
      return { 0, 0, 5, -1, 1 }
    end
    if busd + usd > lusd or busd >= lusd then
      return { 0, 0, 5, until_end, 0 }
    end
  end
  btok, busd = btok + tok, busd + usd
  redis.call('HSET', bkey, 'w', int(bwin), 'tok', int(btok), 'usd', int(busd))
  if tonumber(cur[1]) ~= bwin then
    redis.call('PEXPIREAT', bkey, int(((bwin + 1) * wsecs + 3600) * 1000))
  end
elseif bop == 2 then
  local win, tok, usd = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local cur = redis.call('HMGET', bkey, 'w', 'tok', 'usd')
  if tonumber(cur[1]) == win then
    btok = math.max(0, redis.call('HINCRBY', bkey, 'tok', int(-tok)))
    busd = math.max(0, redis.call('HINCRBY', bkey, 'usd', int(-usd)))
    bwin = win
  end
end

for _, c in ipairs(charges) do
  if c.rpm >= 0 or c.tpm >= 0 then
    -- Every field read in `window` and written back in one call: nothing
    -- else runs between them (a script is atomic).
    local w = c.w
    local fields = {}
    if c.rpm >= 0 then
      fields = { 'r' .. int(now_sec), int(w.cur_req + 1), 'R', int(w.req + 1) }
    end
    if c.tpm >= 0 then
      fields[#fields + 1] = 't' .. int(now_sec)
      fields[#fields + 1] = int(w.cur_tok + c.tokens)
      fields[#fields + 1] = 'T'
      fields[#fields + 1] = int(w.tok + c.tokens)
    end
    if not w.oldest then
      fields[#fields + 1] = 'o'
      fields[#fields + 1] = int(now_sec)
    end
    redis.call('HSET', c.rate, unpack(fields))
    -- Set once a second (when this second's bucket is new), the expiry
    -- outlives the newest bucket by the window.
    if w.cur_req == 0 and w.cur_tok == 0 then
      redis.call('PEXPIRE', c.rate, (WINDOW + 2) * 1000)
    end
    if c.rpm >= 0 then
      w.cur_req, w.req = w.cur_req + 1, w.req + 1
    end
    if c.tpm >= 0 then
      w.cur_tok, w.tok = w.cur_tok + c.tokens, w.tok + c.tokens
    end
    w.oldest = w.oldest or now_sec
  end
  if c.cc >= 0 then
    redis.call('ZADD', c.conc, int(now_ms + lease_ms), member)
    if redis.call('PTTL', c.conc) < lease_ms then
      redis.call('PEXPIRE', c.conc, int(lease_ms + 1000))
    end
  end
end

return { 1, now_sec, btok, busd, bwin }
