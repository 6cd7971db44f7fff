-- wrk script: BENCH_MODE get, put or post on ids bench0 .. bench<BENCH_IDS - 1>, or
-- post_key: a POST with an Idempotency-Key of its own (this run, this thread, a counter).
local mode = os.getenv("BENCH_MODE")
local ids = tonumber(os.getenv("BENCH_IDS"))
local body = '{"name":"Joe","lastName":"Doe","email":"joe@example.com",'
  .. '"phone":"+1 555 0100","balance":1000}'
local json = {["Content-Type"] = "application/json"}
local threads, sent = 0, 0
-- Globals: setup() sets them in each thread's own copy of this script.
run_id, thread_number = tostring(os.time()), 0

setup = function(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
  thread:set("run_id", run_id)
end

request = function()
  local path = "/customers/bench" .. math.random(0, ids - 1)
  if mode == "get" then
    return wrk.format("GET", path)
  elseif mode == "put" then
    return wrk.format("PUT", path, json, body)
  end
  if mode == "post_key" then
    sent = sent + 1
    local key = run_id .. "-" .. thread_number .. "-" .. sent
    return wrk.format("POST", "/customers", {["Content-Type"] = "application/json",
      ["Idempotency-Key"] = key}, body)
  end
  return wrk.format("POST", "/customers", json, body)
end

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.3f, "socket_errors": %d, "non_2xx": %d, '
    .. '"p50_ms": %.3f, "p99_ms": %.3f}\n',
    summary.requests, summary.duration / 1e6,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
