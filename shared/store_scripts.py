"""Lua scripts of the job store: each runs atomically inside Redis.

Key layout (prefix ``fg:``):
  job:{id}                      hash   the job record (each field a string; structured ones JSON)
  job:{id}:events               stream every transition and progress event, bounded
  jobs                          zset   every job id (score 0, ordered by id = creation time), for admin search
  owner:{owner}:jobs            zset   the owner's job ids (score 0, ordered by id = creation time)
  owner:{owner}:status:{status} zset   the same, per status
  queue:{model}                 zset   queued job ids in the order workers take them: band * 1e13 + round,
                                       then id (fair share, docs/design.md); queue_position is the rank
  queue:{model}:{priority}:owner:{owner}  zset  the owner's queued jobs of that band, by round
  queue:{model}:{priority}:round          string the round being served in that band
  queue:{model}:{priority}:served         set    owners already served in that round
  ticket:{message}              string the jobs a task message claimed (comma list: one, or a batch), while
                                       any of them runs under it
  worker:{id}:alive             string present while the worker heartbeats (expires)
  outbox                        stream events a job's webhook selected, for the delivery dispatcher
  running                       set    running job ids (the sweeper checks their workers' heartbeats)
  retention                     zset   terminal job ids by the time they ended (the sweeper purges old ones)
"""

# Shared by every script: events (with the webhook outbox), fair-share queueing, and the one function
# that moves a job between statuses.
PRELUDE = """
local BANDS = {high = 0, normal = 1, low = 2}
local BAND_WIDTH = 1e13

-- Append an event to the job's stream and, when the job's webhook selected that type, to the outbox in
-- the same atomic step (so no webhook is lost between the two).
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

-- Fair share: within a priority band, owners are served in rounds, one job per owner per round.
local function fair_place(job)
  local f = redis.call('HMGET', job, 'id', 'model', 'owner', 'priority')
  local priority = BANDS[f[4]] and f[4] or 'normal'
  local band = 'fg:queue:' .. f[2] .. ':' .. priority
  return f[1], f[2], f[3], BANDS[priority], band .. ':owner:' .. f[3], band .. ':round', band .. ':served'
end

-- A job joins its model's queue in the round after its owner's last queued job, and no earlier than the
-- round being served (the next one if the owner was already served in it): an idle owner banks no
-- credit, a busy one cannot jump ahead by submitting one job at a time.
local function enqueue(job)
  local id, model, owner, band, mine, round_key, served_key = fair_place(job)
  local last = redis.call('ZREVRANGE', mine, 0, 0, 'WITHSCORES')[2]
  local current = tonumber(redis.call('GET', round_key) or '0')
  if redis.call('SISMEMBER', served_key, owner) == 1 then current = current + 1 end
  local round = math.max(tonumber(last or '0') + 1, current)
  redis.call('ZADD', mine, round, id)
  redis.call('ZADD', 'fg:queue:' .. model, band * BAND_WIDTH + round, id)
end

local function dequeue(job)
  local id, model, _, _, mine = fair_place(job)
  redis.call('ZREM', 'fg:queue:' .. model, id)
  redis.call('ZREM', mine, id)
end

-- A queued job is taken: its round becomes the one being served, and its owner is served in it.
local function serve(job)
  local id, _, owner, _, mine, round_key, served_key = fair_place(job)
  local round = tonumber(redis.call('ZSCORE', mine, id) or '0')
  if round > tonumber(redis.call('GET', round_key) or '0') then
    redis.call('SET', round_key, round)
    redis.call('DEL', served_key)
  end
  redis.call('SADD', served_key, owner)
end

-- `fg:ticket:{message}` lists (comma separated) the jobs a message claimed that still run under it: one
-- job, or a batch (docs/design.md, "Batching"). A job leaving `running` leaves the list; the key goes
-- with the last one, so a redelivery stays a duplicate for as long as any job of the batch runs.
local function release_ticket(ticket, id)
  local key = 'fg:ticket:' .. ticket
  local held = redis.call('GET', key)
  if not held then return end
  local left = {}
  for member in string.gmatch(held, '[^,]+') do
    if member ~= id then left[#left + 1] = member end
  end
  if #left == 0 then redis.call('DEL', key) else redis.call('SET', key, table.concat(left, ',')) end
end

-- Move a job from `status` to `to` as `attempt`: set `fields` (a flat name/value list), move it between
-- index sets and the queue, and append `event_types` (comma list) with `extra` (a table) to its events.
local function move(job, stream, status, to, attempt, fields, event_types, extra, maxlen)
  local cur = redis.call('HMGET', job, 'id', 'owner', 'model', 'progress', 'ticket')
  local id, owner, model, progress, ticket = cur[1], cur[2], cur[3], cur[4], cur[5]
  if status == 'queued' and to ~= 'queued' then dequeue(job) end
  redis.call('HSET', job, 'status', to, 'attempt', attempt)
  for i = 1, #fields, 2 do redis.call('HSET', job, fields[i], fields[i + 1]) end
  local prefix = 'fg:owner:' .. owner
  redis.call('ZREM', prefix .. ':status:' .. status, id)
  redis.call('ZADD', prefix .. ':status:' .. to, 0, id)
  if to == 'running' then redis.call('SADD', 'fg:running', id) else redis.call('SREM', 'fg:running', id) end
  if status == 'running' and to ~= 'running' and ticket and ticket ~= '' then
    release_ticket(ticket, id)  -- the message that claimed it is spent once its whole batch has left
    redis.call('HSET', job, 'ticket', '')
  end
  if to == 'succeeded' or to == 'failed' or to == 'canceled' then
    redis.call('ZADD', 'fg:retention', redis.call('TIME')[1], id)
  else
    redis.call('ZREM', 'fg:retention', id)
  end
  if to == 'queued' and status ~= 'queued' then enqueue(job) end
  for event_type in string.gmatch(event_types, '[^,]+') do
    extra['type'] = event_type
    extra['job_id'] = id
    extra['status'] = to
    extra['attempt'] = tonumber(attempt)
    extra['progress'] = cjson.decode(progress)
    emit(job, stream, maxlen, event_type, cjson.encode(extra))
  end
end
"""


# KEYS[1] job hash, KEYS[2] its event stream.
# ARGV: 1 to, 2 allowed from (comma list), 3 expected attempt or "", 4 expected worker or "",
#       5 bump attempt ("1"/"0"), 6 event types (comma list), 7 event extra JSON, 8 stream maxlen,
#       9.. field/value pairs to set.
# Returns {"ok", old_status, attempt} or {"err", reason, status, attempt}.
TRANSITION = (
    PRELUDE
    + """
local job, stream = KEYS[1], KEYS[2]
local to, allowed = ARGV[1], ARGV[2]
local cur = redis.call('HMGET', job, 'status', 'attempt', 'worker')
local status, attempt, worker = cur[1], cur[2], cur[3]
if not status then return {'err', 'not_found', '', ''} end
if not string.find(',' .. allowed .. ',', ',' .. status .. ',', 1, true) then
  return {'err', 'illegal', status, attempt}
end
if ARGV[3] ~= '' and ARGV[3] ~= attempt then return {'err', 'stale', status, attempt} end
if ARGV[4] ~= '' and ARGV[4] ~= (worker or '') then return {'err', 'stale', status, attempt} end
local new_attempt = attempt
if ARGV[5] == '1' then new_attempt = tostring(tonumber(attempt) + 1) end
local fields = {}
for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
move(job, stream, status, to, new_attempt, fields, ARGV[6], cjson.decode(ARGV[7]), ARGV[8])
return {'ok', status, new_attempt}
"""
)

# A task message is a ticket for its model's queue. ARGV: 1 model, 2 ticket (the message's id, the same
# on every delivery of it), 3 worker, 4 started_at, 5 max attempts, 6 stream maxlen, 7 batch size (the
# most jobs the worker runs together), 8 how many queued jobs of the head's band to look through for
# batch mates.
# A ticket whose jobs still run under it is a redelivery: a duplicate while their worker lives (the same
# worker: a retried claim, given its jobs back), else one of them is reclaimed as attempt + 1, or
# reported lost past the maximum attempts. Any other ticket claims the head of the queue and, when the
# batch size allows, the queued jobs that batch with it (docs/design.md, "Batching").
# Returns {"claimed", id, ...}, {"lost", id} (the caller fails it) or {"none", reason}.
CLAIM = (
    PRELUDE
    + """
local model, ticket, worker, started_at = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_batch, lookahead = tonumber(ARGV[7] or '1'), tonumber(ARGV[8] or '0')
local ticket_key = 'fg:ticket:' .. ticket

local function start(id, status, attempt, event_types)
  local job = 'fg:job:' .. id
  local progress = cjson.decode(redis.call('HGET', job, 'progress') or '{}')
  progress['step'] = 0
  local fields = {'worker', worker, 'started_at', started_at, 'progress', cjson.encode(progress),
                  'ticket', ticket}
  move(job, job .. ':events', status, 'running', attempt, fields, event_types, {}, ARGV[6])
end

local function claimed(ids)
  redis.call('SET', ticket_key, table.concat(ids, ','))
  return {'claimed', unpack(ids)}
end

-- Jobs run together when only their prompts and seeds differ: one image each, no reference images, the
-- same size, steps, guidance, cache preset and negative prompt / true CFG scale. nil: the job runs alone.
local BATCH_FIELDS = {'width', 'height', 'num_inference_steps', 'guidance_scale', 'cache',
                      'negative_prompt', 'true_cfg_scale'}
local function batch_key(job)
  local ok, params = pcall(cjson.decode, redis.call('HGET', job, 'params') or '')
  if not ok or type(params) ~= 'table' or params['num_images'] ~= 1 then return nil end
  if type(params['images']) == 'table' and next(params['images']) ~= nil then return nil end
  local parts = {}
  for _, name in ipairs(BATCH_FIELDS) do
    local value = params[name]
    parts[#parts + 1] = value == nil and 'null' or cjson.encode(value)
  end
  return table.concat(parts, ',')
end

-- The head's batch mates: the next queued jobs of its priority band, in the queue's (fair-share) order,
-- that batch with it, skipping the others, until the batch is full or `lookahead` jobs were looked at.
local function add_mates(queue, head, score, ids)
  local key = batch_key('fg:job:' .. head)
  if not key then return end
  local band = math.floor(tonumber(score) / BAND_WIDTH)
  local low = string.format('%.0f', band * BAND_WIDTH)
  local high = '(' .. string.format('%.0f', (band + 1) * BAND_WIDTH)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', queue, low, high, 'LIMIT', 0, lookahead)) do
    if #ids >= max_batch then return end
    local job = 'fg:job:' .. id
    local cur = redis.call('HMGET', job, 'status', 'attempt')
    if cur[1] == 'queued' and batch_key(job) == key then
      serve(job)
      start(id, 'queued', cur[2], 'job.started')
      ids[#ids + 1] = id
    end
  end
end

local held = redis.call('GET', ticket_key)
if held then
  local mine, first = {}, nil
  for id in string.gmatch(held, '[^,]+') do
    local cur = redis.call('HMGET', 'fg:job:' .. id, 'status', 'attempt', 'worker', 'ticket')
    if cur[1] == 'running' and cur[4] == ticket then
      if (cur[3] or '') == worker then mine[#mine + 1] = id end
      first = first or {id, cur[2], cur[3] or ''}
    end
  end
  if #mine > 0 then return {'claimed', unpack(mine)} end
  if first then
    local id, attempt, previous = first[1], first[2], first[3]
    if previous ~= '' and redis.call('EXISTS', 'fg:worker:' .. previous .. ':alive') == 1 then
      return {'none', 'duplicate'}
    end
    if tonumber(attempt) >= tonumber(ARGV[5]) then return {'lost', id} end
    -- One job of a dead worker's batch is reclaimed; the sweeper requeues the others, each with a message.
    start(id, 'running', tostring(tonumber(attempt) + 1), 'job.requeued,job.started')
    return claimed({id})
  end
  redis.call('DEL', ticket_key)
end

local queue = 'fg:queue:' .. model
for _ = 1, 100 do
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  if not head[1] then return {'none', 'empty'} end
  local job = 'fg:job:' .. head[1]
  local cur = redis.call('HMGET', job, 'status', 'attempt')
  if cur[1] == 'queued' then
    serve(job)
    start(head[1], 'queued', cur[2], 'job.started')
    local ids = {head[1]}
    if max_batch > 1 then add_mates(queue, head[1], head[2], ids) end
    return claimed(ids)
  end
  redis.call('ZREM', queue, head[1])  -- an index entry left behind by a purge: not a job to run
end
return {'none', 'empty'}
"""
)

# KEYS[1] job hash, KEYS[2] its event stream. ARGV: 1 attempt, 2 worker, 3 progress JSON, 4 maxlen.
# Records progress only for the running attempt that owns the job. Returns the job's status, "superseded"
# when it runs under another attempt or worker (reclaimed), or "cancel" when a cancel was requested for it
# (the worker then stops before the next step).
PROGRESS = (
    PRELUDE
    + """
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'worker', 'id', 'cancel_requested')
if cur[1] ~= 'running' then return cur[1] or '' end
if cur[2] ~= ARGV[1] or cur[3] ~= ARGV[2] then return 'superseded' end
if cur[5] and cur[5] ~= '' then return 'cancel' end
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
local data = cjson.encode({type = 'job.progress', job_id = cur[4], status = 'running',
                           attempt = tonumber(cur[2]), progress = cjson.decode(ARGV[3])})
emit(KEYS[1], KEYS[2], ARGV[4], 'job.progress', data)
return 'running'
"""
)

# A submission in one round trip. KEYS[1] job hash, KEYS[2] its event stream.
# ARGV: 1 maxlen, 2 owner, 3 model, 4 event JSON, 5 max queued jobs of the model (0: no limit),
#       6 max active jobs of the owner (0: no limit), 7 the key's rate counter ("": no limit),
#       8 rate limit, 9 the counter's TTL, 10 deadline (Unix seconds, "": none), 11 the broker list of
#       the task message ("": none), 12 the message, 13.. field/value pairs of the new record.
# The quotas are checked in the order the gateway reports them (queue full, active jobs, rate; the rate
# counter counts the attempt once the first two pass), then the queued job is created with its indexes
# and first event, its deadline recorded and its task message pushed, all or nothing.
# Returns {"ok", queue position}, {"queue_full", depth}, {"too_many_active_jobs", active},
# {"rate_limit_exceeded", count} or {"exists", 0}.
SUBMIT = (
    PRELUDE
    + """
local job, stream = KEYS[1], KEYS[2]
local owner, model = ARGV[2], ARGV[3]
local queue = 'fg:queue:' .. model
local max_queued, max_active = tonumber(ARGV[5]), tonumber(ARGV[6])
if max_queued > 0 then
  local depth = redis.call('ZCARD', queue)
  if depth >= max_queued then return {'queue_full', depth} end
end
local prefix = 'fg:owner:' .. owner
if max_active > 0 then
  local active = redis.call('ZCARD', prefix .. ':status:queued')
  active = active + redis.call('ZCARD', prefix .. ':status:running')
  if active >= max_active then return {'too_many_active_jobs', active} end
end
if ARGV[7] ~= '' then
  local count = redis.call('INCR', ARGV[7])
  redis.call('EXPIRE', ARGV[7], ARGV[9])
  if count > tonumber(ARGV[8]) then return {'rate_limit_exceeded', count} end
end
if redis.call('EXISTS', job) == 1 then return {'exists', 0} end
for i = 13, #ARGV, 2 do redis.call('HSET', job, ARGV[i], ARGV[i + 1]) end
local id = redis.call('HGET', job, 'id')
redis.call('ZADD', prefix .. ':jobs', 0, id)
redis.call('ZADD', 'fg:jobs', 0, id)
redis.call('ZADD', prefix .. ':status:queued', 0, id)
enqueue(job)
emit(job, stream, ARGV[1], 'job.queued', ARGV[4])
if ARGV[10] ~= '' then redis.call('ZADD', 'fg:deadlines', ARGV[10], id) end
if ARGV[11] ~= '' then redis.call('LPUSH', ARGV[11], ARGV[12]) end
return {'ok', redis.call('ZRANK', queue, id)}
"""
)
