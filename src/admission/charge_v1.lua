-- llmgw_charge_v1: one admission or one settle, in one round trip.
-- First gives back earlier reservations (a settled call, an attempt that
-- moved to another target), then checks every limit of the new charges and
-- reserves them all, or none. Time is the server's (TIME), never a replica's.
-- Key layout v1 (every key under one hash tag, so one Cluster slot):
--   rate:<subject>  hash  r<sec> = requests, t<sec> = tokens, one-second buckets
--   conc:<subject>  zset  member = ticket id, score = lease end (ms)
--   budget:<key>    hash  w = window index, tok = tokens, usd = nano-USD
-- A change of layout is a new script name (charge_v2) and new key names, so
-- old and new replicas can run side by side during a rolling update.
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
    if redis.call('HEXISTS', rate, field) == 1 then
      if redis.call('HINCRBY', rate, field, int(-refund)) <= 0 then
        redis.call('HDEL', rate, field)
      end
    end
  end
  if lease == 1 then
    redis.call('ZREM', conc, member)
  end
end

-- The live buckets of a rate hash (stale ones are dropped on the way).
local function window(rate)
  local all = redis.call('HGETALL', rate)
  local req, tok, buckets, stale = 0, 0, {}, {}
  for i = 1, #all, 2 do
    local field, v = all[i], tonumber(all[i + 1])
    local sec = tonumber(string.sub(field, 2))
    if sec < now_sec - WINDOW then
      stale[#stale + 1] = field
    else
      local b = buckets[sec]
      if not b then
        b = { 0, 0 }
        buckets[sec] = b
      end
      if string.sub(field, 1, 1) == 'r' then
        b[1] = b[1] + v
        req = req + v
      else
        b[2] = b[2] + v
        tok = tok + v
      end
    end
  end
  if #stale > 0 then
    redis.call('HDEL', rate, unpack(stale))
  end
  return req, tok, buckets
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

local charges = {}
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
    local req, tok, buckets = window(c.rate)
    if c.rpm >= 0 and req + 1 > c.rpm then
      return { 0, i, 1, retry_ms(buckets, 1, req + 1 - c.rpm), 0 }
    end
    if c.tpm >= 0 then
      if c.tokens > c.tpm then
        return { 0, i, 2, -1, 1 }
      end
      if tok + c.tokens > c.tpm then
        return { 0, i, 2, retry_ms(buckets, 2, tok + c.tokens - c.tpm), 0 }
      end
    end
  end
  if c.cc >= 0 then
    redis.call('ZREMRANGEBYSCORE', c.conc, '-inf', now_ms)
    if not redis.call('ZSCORE', c.conc, member) and redis.call('ZCARD', c.conc) >= c.cc then
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
  redis.call('PEXPIREAT', bkey, int(((bwin + 1) * wsecs + 3600) * 1000))
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
    if c.rpm >= 0 then
      redis.call('HINCRBY', c.rate, 'r' .. int(now_sec), 1)
    end
    if c.tpm >= 0 then
      redis.call('HINCRBY', c.rate, 't' .. int(now_sec), int(c.tokens))
    end
    redis.call('PEXPIRE', c.rate, (WINDOW + 2) * 1000)
  end
  if c.cc >= 0 then
    redis.call('ZADD', c.conc, int(now_ms + lease_ms), member)
    if redis.call('PTTL', c.conc) < lease_ms then
      redis.call('PEXPIRE', c.conc, int(lease_ms + 1000))
    end
  end
end

return { 1, now_sec, btok, busd, bwin }
