-- wrk script: BENCH_MODE get, put or post on ids bench0 .. bench<BENCH_IDS - 1>.
local mode = os.getenv("BENCH_MODE")
local ids = tonumber(os.getenv("BENCH_IDS"))
local body = '{"name":"Joe","lastName":"Doe","email":"joe@example.com",'
  .. '"phone":"+1 555 0100","balance":1000}'
local json = {["Content-Type"] = "application/json"}

request = function()
  local path = "/customers/bench" .. math.random(0, ids - 1)
  if mode == "get" then
    return wrk.format("GET", path)
  elseif mode == "put" then
    return wrk.format("PUT", path, json, body)
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
