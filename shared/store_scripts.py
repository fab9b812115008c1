"""Lua scripts of the job store: each runs atomically inside Redis.

Key layout (prefix ``fg:``):
  job:{id}                      hash   the job record (each field a string; structured ones JSON)
  job:{id}:events               stream every transition and progress event, bounded
  jobs                          zset   every job id (score 0, ordered by id = creation time), for admin search
  owner:{owner}:jobs            zset   the owner's job ids (score 0, ordered by id = creation time)
  owner:{owner}:status:{status} zset   the same, per status
  queue:{model}                 zset   queued job ids by submission sequence (for queue_position)
  seq                           string submission sequence counter
  worker:{id}:alive             string present while the worker heartbeats (expires)
  outbox                        stream events a job's webhook selected, for the delivery dispatcher
  running                       set    running job ids (the sweeper checks their workers' heartbeats)
  retention                     zset   terminal job ids by the time they ended (the sweeper purges old ones)
"""

# Shared by every script: append an event to the job's stream and, when the job's webhook selected
# that type, to the outbox in the same atomic step (so no webhook is lost between the two).
EMIT = """
local function emit(job, stream, maxlen, event_type, data)
  local entry = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'type', event_type, 'data', data)
  local hook = redis.call('HGET', job, 'webhook_url')
  if hook and hook ~= '' then
    local selected = redis.call('HGET', job, 'webhook_events') or ''
    if string.find(',' .. selected .. ',', ',' .. event_type .. ',', 1, true) then
      redis.call('XADD', 'fg:outbox', '*', 'job_id', redis.call('HGET', job, 'id'), 'event_id', entry,
                 'type', event_type)
    end
  end
  return entry
end

-- Queue order: priority band first (high 0, normal 1, low 2), then submission sequence.
local function queue_score(job)
  local bands = {high = 0, normal = 1, low = 2}
  local band = bands[redis.call('HGET', job, 'priority') or 'normal'] or 1
  return band * 1e13 + redis.call('INCR', 'fg:seq')
end
"""


# KEYS[1] job hash, KEYS[2] its event stream.
# ARGV: 1 to, 2 allowed from (comma list), 3 expected attempt or "", 4 expected worker or "",
#       5 bump attempt ("1"/"0"), 6 event types (comma list), 7 event extra JSON, 8 stream maxlen,
#       9.. field/value pairs to set.
# Returns {"ok", old_status, attempt} or {"err", reason, status, attempt}.
TRANSITION = (
    EMIT
    + """
local job, stream = KEYS[1], KEYS[2]
local to, allowed = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', job, 'status', 'attempt', 'worker', 'owner', 'model', 'progress', 'id')
local status, attempt, worker, owner, model, progress, id =
  cur[1], cur[2], cur[3], cur[4], cur[5], cur[6], cur[7]
if not status then return {'err', 'not_found', '', ''} end
if not string.find(',' .. allowed .. ',', ',' .. status .. ',', 1, true) then
  return {'err', 'illegal', status, attempt}
end
if ARGV[3] ~= '' and ARGV[3] ~= attempt then return {'err', 'stale', status, attempt} end
if ARGV[4] ~= '' and ARGV[4] ~= (worker or '') then return {'err', 'stale', status, attempt} end
local new_attempt = attempt
if ARGV[5] == '1' then new_attempt = tostring(tonumber(attempt) + 1) end
redis.call('HSET', job, 'status', to, 'attempt', new_attempt)
for i = 9, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
local prefix = 'fg:owner:' .. owner
redis.call('ZREM', prefix .. ':status:' .. status, id)
redis.call('ZADD', prefix .. ':status:' .. to, 0, id)
if status == 'queued' and to ~= 'queued' then redis.call('ZREM', 'fg:queue:' .. model, id) end
if to == 'running' then redis.call('SADD', 'fg:running', id) else redis.call('SREM', 'fg:running', id) end
if to == 'succeeded' or to == 'failed' or to == 'canceled' then
  redis.call('ZADD', 'fg:retention', redis.call('TIME')[1], id)
else
  redis.call('ZREM', 'fg:retention', id)
end
if to == 'queued' and status ~= 'queued' then
  redis.call('ZADD', 'fg:queue:' .. model, queue_score(job), id)
end
local extra = cjson.decode(ARGV[7])
for event_type in string.gmatch(ARGV[6], '[^,]+') do
  extra['type'] = event_type
  extra['job_id'] = id
  extra['status'] = to
  extra['attempt'] = tonumber(new_attempt)
  extra['progress'] = cjson.decode(progress)
  emit(job, stream, ARGV[8], event_type, cjson.encode(extra))
end
return {'ok', status, new_attempt}
"""
)

# KEYS[1] job hash, KEYS[2] its event stream. ARGV: 1 attempt, 2 worker, 3 progress JSON, 4 maxlen.
# Records progress only for the running attempt that owns the job. Returns the job's status, or
# "cancel" when a cancel was requested for it (the worker then stops before the next step).
PROGRESS = (
    EMIT
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker', 'id', 'cancel_requested')
if cur[1] ~= 'running' or cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2] then return cur[1] or '' end
if cur[5] and cur[5] ~= '' then return 'cancel' end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
local data = cjson.encode({type = 'job.progress', job_id = cur[4], status = 'running',
                           attempt = tonumber(cur[2]), progress = cjson.decode(ARGV[3])})
emit(KEYS[1], KEYS[2], ARGV[4], 'job.progress', data)
return 'running'
"""
)

# KEYS[1] job hash, KEYS[2] its event stream. ARGV: 1 maxlen, 2 owner, 3 model, 4 event JSON,
# 5.. field/value pairs of the new record. Creates a queued job with its indexes and first event.
CREATE = (
    EMIT
    + """
local job, stream = KEYS[1], KEYS[2]
if redis.call('EXISTS', job) == 1 then return 0 end
for i = 5, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
local id = redis.call('HGET', job, 'id')
redis.call('ZADD', 'fg:owner:' .. ARGV[2] .. ':jobs', 0, id)
redis.call('ZADD', 'fg:jobs', 0, id)
redis.call('ZADD', 'fg:owner:' .. ARGV[2] .. ':status:queued', 0, id)
redis.call('ZADD', 'fg:queue:' .. ARGV[3], queue_score(job), id)
emit(job, stream, ARGV[1], 'job.queued', ARGV[4])
return 1
"""
)
