"""Lua scripts of the job store: each runs atomically inside Redis.

Key layout (prefix ``fg:``):
  job:{id}                      hash   the job record (each field a string; structured ones JSON)
  job:{id}:events               stream every transition and progress event, bounded
  owner:{owner}:jobs            zset   the owner's job ids (score 0, ordered by id = creation time)
  owner:{owner}:status:{status} zset   the same, per status
  queue:{model}                 zset   queued job ids by submission sequence (for queue_position)
  seq                           string submission sequence counter
  worker:{id}:alive             string present while the worker heartbeats (expires)
"""

# KEYS[1] job hash, KEYS[2] its event stream.
# ARGV: 1 to, 2 allowed from (comma list), 3 expected attempt or "", 4 expected worker or "",
#       5 bump attempt ("1"/"0"), 6 event types (comma list), 7 event extra JSON, 8 stream maxlen,
#       9.. field/value pairs to set.
# Returns {"ok", old_status, attempt} or {"err", reason, status, attempt}.
TRANSITION = """
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
if to == 'queued' and status ~= 'queued' then
  redis.call('ZADD', 'fg:queue:' .. model, redis.call('INCR', 'fg:seq'), id)
end
local extra = cjson.decode(ARGV[7])
for event_type in string.gmatch(ARGV[6], '[^,]+') do
  extra['type'] = event_type
  extra['job_id'] = id
  extra['status'] = to
  extra['attempt'] = tonumber(new_attempt)
  extra['progress'] = cjson.decode(progress)
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[8], '*', 'type', event_type, 'data', cjson.encode(extra))
end
return {'ok', status, new_attempt}
"""

# KEYS[1] job hash, KEYS[2] its event stream. ARGV: 1 attempt, 2 worker, 3 progress JSON, 4 maxlen.
# Records progress only for the running attempt that owns the job; returns the job's status.
PROGRESS = """
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker', 'id')
if cur[1] ~= 'running' or cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2] then return cur[1] or '' end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
local data = cjson.encode({type = 'job.progress', job_id = cur[4], status = 'running',
                           attempt = tonumber(cur[2]), progress = cjson.decode(ARGV[3])})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'job.progress', 'data', data)
return 'running'
"""
