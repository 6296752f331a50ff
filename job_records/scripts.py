"""The Lua scripts behind `job_records.store`: each state change of a job record is
one script, so it is atomic in Redis.

Kept apart from the client so the state machine reads in one place. Each script says
its KEYS and ARGV layout; the client builds them. Batched scripts (CREATE, START,
FINISH) take any number of jobs in one call: one round trip, and the argument
encoding, most of a redis-py call's cost, done once.
"""

# Counters are read once per call (`count`; one call places a whole batch), and an
# INCR in the same call updates the cached value.
# KEYS[first..first+5]: submitted/started counter pairs, the job's own priority first,
# then the higher ones, then the lower ones (`levels` pairs are counted); then the
# RATE_WINDOW_BUCKETS completion-rate buckets. `seq` stands in for its own level's
# submitted count.
PLACEMENT = """
local counts = {}
local function count(key)
  local value = counts[key]
  if value == nil then
    value = tonumber(redis.call('GET', key) or '0')
    counts[key] = value
  end
  return value
end
local function placement(first, levels, seq)
  local waiting = 0
  for i = 0, levels - 1 do
    local submitted = count(KEYS[first + 2 * i])
    if i == 0 and seq then submitted = seq end
    waiting = waiting + submitted - count(KEYS[first + 2 * i + 1])
  end
  local done, active = 0, 0
  for j = first + 6, first + 11 do
    local n = count(KEYS[j])
    done = done + n
    if n > 0 then active = active + 1 end
  end
  return {waiting, done, active}
end
"""
# One call for any number of jobs. KEYS: the 12 placement keys of each (model,
# priority) group among the jobs, then each job's record. ARGV: the count of per-job
# arguments, the count of groups, then per job: its group, levels, record TTL and fields.
CREATE = (
    PLACEMENT
    + """
local per, groups = tonumber(ARGV[1]), tonumber(ARGV[2])
local first_record = 12 * groups
local results = {}
for j = 0, #KEYS - first_record - 1 do
  local base = 3 + j * per
  local record, group = KEYS[first_record + j + 1], 12 * tonumber(ARGV[base]) + 1
  local record_ttl = ARGV[base + 2]
  local seq = tonumber(redis.call('HGET', record, 'seq'))
  if not seq and redis.call('HEXISTS', record, 'started_ms') == 0 then
    seq = redis.call('INCR', KEYS[group])
    counts[KEYS[group]] = seq
    redis.call('HSET', record, 'seq', seq)
  end
  for i = base + 3, base + per - 1, 2 do redis.call('HSETNX', record, ARGV[i], ARGV[i + 1]) end
  redis.call('EXPIRE', record, record_ttl)
  local where = placement(group, tonumber(ARGV[base + 1]), seq)
  results[j + 1] = {where[1], where[2], where[3]}
end
return results
"""
)
# KEYS: the placement keys. ARGV: levels, seq.
PLACE = (
    PLACEMENT
    + """
return placement(1, tonumber(ARGV[1]), tonumber(ARGV[2]))
"""
)
# One call per batch. KEYS: per job its record and started counter. ARGV: ttl, now,
# the count of per-job arguments, then per job: attempt and its fields.
START = """
local ttl, now, per = ARGV[1], ARGV[2], tonumber(ARGV[3])
local results = {}
for j = 0, #KEYS / 2 - 1 do
  local record, started, base = KEYS[2 * j + 1], KEYS[2 * j + 2], 4 + j * per
  local status = redis.call('HGET', record, 'status')
  if status and status ~= 'queued' and status ~= 'running' then
    local e = redis.call('HMGET', record, 'delivery', 'finished_ms', 'attempts', 'output', 'error')
    results[j + 1] = {status, e[1] or '', e[2] or '0', e[3] or '0', e[4] or '', e[5] or ''}
  else
    for i = base + 1, base + per - 1, 2 do redis.call('HSETNX', record, ARGV[i], ARGV[i + 1]) end
    local first_start = redis.call('HSETNX', record, 'started_ms', now) == 1
    if first_start and redis.call('HEXISTS', record, 'seq') == 1 then redis.call('INCR', started) end
    redis.call('HSET', record, 'status', 'running', 'attempts', ARGV[base])
    redis.call('EXPIRE', record, ttl)
    results[j + 1] = {'running', '', '0', '0', '', ''}
  end
end
return results
"""
# One call per batch. KEYS: per job its record, rate bucket, its owner's set of jobs
# queued or running (QUEUED_RESERVE) and its express mark; then the express lane's open
# key and list (job_records.express_lane). ARGV: ttl, now, channel, the count of per-job
# arguments, the lane's longest list, then per job: status, attempts, result field,
# result, id, its callback event for the lane ('' = not offered) and its fields. An
# offered event whose ending this call records goes onto the lane while a dispatcher
# holds it open (the open key's value is the mark's lease, ms). Returns: each job's
# status now, and the ids of the jobs whose event went onto the lane.
FINISH = """
if #KEYS == 0 then return {{}, {}} end
local ttl, now, channel, per, longest = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local terminal = {succeeded = true, failed = true, expired = true, canceled = true}
local open, lane = KEYS[#KEYS - 1], KEYS[#KEYS]
local lease = redis.call('GET', open)
local results, pushed = {}, {}
for j = 0, (#KEYS - 2) / 4 - 1 do
  local record, rate, active, base = KEYS[4 * j + 1], KEYS[4 * j + 2], KEYS[4 * j + 3], 6 + j * per
  local status = redis.call('HGET', record, 'status')
  if status and terminal[status] then
    results[j + 1] = status
  else
    for i = base + 6, base + per - 1, 2 do redis.call('HSETNX', record, ARGV[i], ARGV[i + 1]) end
    redis.call('HSET', record, 'status', ARGV[base], 'finished_ms', now, 'attempts', ARGV[base + 1])
    redis.call('ZREM', active, ARGV[base + 4])
    redis.call('HSET', record, ARGV[base + 2], ARGV[base + 3])
    redis.call('EXPIRE', record, ttl)
    redis.call('INCR', rate)
    redis.call('EXPIRE', rate, 120)
    redis.call('PUBLISH', channel, ARGV[base + 4])
    results[j + 1] = ARGV[base]
    if ARGV[base + 5] ~= '' and lease and redis.call('LLEN', lane) < longest then
      redis.call('RPUSH', lane, ARGV[base + 5])
      redis.call('SET', KEYS[4 * j + 4], 'pushed', 'PX', lease)
      pushed[#pushed + 1] = ARGV[base + 4]
    end
  end
end
return {results, pushed}
"""


def _as_function(name: str, source: str) -> str:
    """A script's body as a local Lua function of its own KEYS and ARGV."""
    return f"local function {name}(KEYS, ARGV)\n{source}end\n"


# A quick batch (ray_workers.job_worker) is marked running and its endings recorded in one
# call, after the model ran: START, then FINISH, each on its own slice of the keys and
# arguments, so both keep one definition. KEYS: START's, then FINISH's. ARGV: START's key
# count and argument count, START's arguments, then FINISH's. Returns both results.
START_AND_FINISH = (
    _as_function("start", START)
    + _as_function("finish", FINISH)
    + """
local start_keys, start_args = tonumber(ARGV[1]), tonumber(ARGV[2])
local function slice(list, first, last)
  local part = {}
  for i = first, last do part[#part + 1] = list[i] end
  return part
end
return {
  start(slice(KEYS, 1, start_keys), slice(ARGV, 3, start_args + 2)),
  finish(slice(KEYS, start_keys + 1, #KEYS), slice(ARGV, start_args + 3, #ARGV)),
}
"""
)

# KEYS: record, started counter, the owner's set of jobs queued or running. ARGV: now,
# channel, id.
CANCEL = """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' then return {0, status or 'expired'} end
redis.call('HSET', KEYS[1], 'status', 'canceled', 'finished_ms', ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[3])
if redis.call('HEXISTS', KEYS[1], 'seq') == 1 then redis.call('INCR', KEYS[2]) end
redis.call('PUBLISH', ARGV[2], ARGV[3])
return {1, 'canceled'}
"""
# An idempotency key's next state, only while it holds ARGV[1] (the reserving request's
# job id): complete (done), keep (uncertain), or release (state '': deleted). ARGV: job
# id, state, status code, TTL.
FENCED_KEY = """
if redis.call('HGET', KEYS[1], 'job_id') ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) return 1 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'status_code', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
# A replayed job's record back to queued, only from a failed ending (or none).
REOPEN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= 'failed' and status ~= 'expired' then return status end
if status then
  redis.call('HDEL', KEYS[1], 'output', 'output_omitted_bytes', 'error', 'finished_ms')
  redis.call('HSET', KEYS[1], 'status', 'queued')
end
return 'reopened'
"""
# Callbacks' delivery states (callbacks.delivery_log), many jobs in one call: a pipeline
# of two commands a job cost the dispatcher four times the client CPU. A record that does
# not exist yet gets these fields only, and its TTL. KEYS: the records. ARGV: the TTL, then
# (state, attempts) per record.
RECORD_DELIVERY = """
for i, key in ipairs(KEYS) do
  redis.call('HSET', key, 'delivery', ARGV[2 * i], 'delivery_attempts', ARGV[2 * i + 1])
  redis.call('EXPIRE', key, ARGV[1])
end
return #KEYS
"""
# ARGV: field, expected value ('' = any existing record), new value, then more field/value pairs.
UPDATE_IF = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' and redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3], unpack(ARGV, 4))
return 1
"""
# KEYS: the key's hash. ARGV: fingerprint, job id, lease.
RESERVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1], 'job_id', ARGV[2], 'state', 'accepting')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'new', ARGV[2], ''}
end
local stored = redis.call('HMGET', KEYS[1], 'fingerprint', 'state', 'job_id', 'status_code')
if stored[1] ~= ARGV[1] then return {'mismatch', '', ''} end
if stored[2] == 'uncertain' then
  redis.call('HSET', KEYS[1], 'state', 'accepting')
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return {'uncertain', stored[3], ''}
end
if stored[2] ~= 'done' then return {'in_flight', '', ''} end
return {'replay', stored[3], stored[4]}
"""

# A tenant's token bucket (rate_per_s, burst), shared by every ingress: take ARGV[3]
# tokens or none. The clock is Redis's own, so ingress clocks need not agree. KEYS: the
# bucket. ARGV: rate per second, burst, tokens wanted. Returns: taken (1/0), tokens left
# (as a string: Lua numbers become integers), ms until the wanted tokens are there.
TAKE_TOKENS = """
local rate, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local tokens, at = burst, now
local held = redis.call('HMGET', KEYS[1], 'tokens', 'at')
if held[1] then tokens, at = tonumber(held[1]), tonumber(held[2]) end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local taken = 0
if tokens >= wanted then
  tokens = tokens - wanted
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
local wait_ms = 0
if taken == 0 then wait_ms = math.ceil((wanted - tokens) * 1000 / rate) end
return {taken, tostring(tokens), wait_ms}
"""
# A tenant's jobs queued or running (max_queued): a sorted set of job ids scored by when
# each stops counting (its record's expiry), so a job that vanished without an ending
# frees its place then. FINISH and CANCEL take a job out. Every script here writes first
# with a command Redis refuses when it is out of memory (HSET, ZADD): a script whose
# first write is one Redis allows then (ZREM, ZREMRANGEBYSCORE) may write past maxmemory.
# KEYS: the set. ARGV: max, now (ms), the jobs' expiry (ms), job ids. Returns: reserved
# (1/0), jobs held after.
QUEUED_RESERVE = """
local held = redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf')
local wanted = #ARGV - 3
if held + wanted > tonumber(ARGV[1]) then return {0, held} end
for i = 4, #ARGV do redis.call('ZADD', KEYS[1], ARGV[3], ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[3])
return {1, held + wanted}
"""
# Which lane a tenant's new jobs of a model go to (ingress.tenant_lanes): a hash of tenant ->
# "lane:lease end (ms)". A tenant keeps its lane while it submits (each call renews its
# lease); one without a live lease takes the lane fewest live leases hold, the shallowest
# of those (depths as the caller read them), so a new tenant does not land behind a lane's
# backlog while an empty lane is free. HSET first: refused when Redis is out of memory.
# KEYS: the hash. ARGV: tenant, lease (ms), lanes, then each lane's depth. Returns: the lane.
LANE_LEASE = """
local tenant, lease, lanes = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local held, mine, stale = {}, nil, {}
for lane = 0, lanes - 1 do held[lane] = 0 end
local leases = redis.call('HGETALL', KEYS[1])
for i = 1, #leases, 2 do
  local sep = string.find(leases[i + 1], ':', 1, true)
  local lane = tonumber(string.sub(leases[i + 1], 1, sep - 1))
  local ends = tonumber(string.sub(leases[i + 1], sep + 1))
  if ends <= now or lane >= lanes then
    table.insert(stale, leases[i])
  elseif leases[i] == tenant then
    mine = lane
  else
    held[lane] = held[lane] + 1
  end
end
if mine == nil then
  mine = 0
  for lane = 1, lanes - 1 do
    local fewer = held[lane] < held[mine]
    local shallower = held[lane] == held[mine] and tonumber(ARGV[4 + lane]) < tonumber(ARGV[4 + mine])
    if fewer or shallower then mine = lane end
  end
end
redis.call('HSET', KEYS[1], tenant, mine .. ':' .. (now + lease))
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
redis.call('PEXPIRE', KEYS[1], lease)
return mine
"""
# The express lane (job_records.store, `take_express`): a dispatcher's copy of an offered
# event, off the callbacks queue, takes the event out of the lane's list if it is still
# there (the lane never had it: the copy sends it); else it learns what the lane made of
# it. KEYS: the list, the job's mark. ARGV: the event. Returns: 'take' (send it),
# 'pushed' (a dispatcher of the lane is sending it: ask again), or the lane's outcome,
# whose mark is then gone. Deletes only: Redis runs it when out of memory too.
EXPRESS_TAKE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  return 'take'
end
local mark = redis.call('GET', KEYS[2])
if not mark then return 'take' end
if mark ~= 'pushed' then redis.call('DEL', KEYS[2]) end
return mark
"""
