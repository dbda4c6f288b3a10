-- wrk script: POST /workflow of the echo workflow with the bearer token, and at the end one
-- machine-readable line (read by report.parse_wrk) with exact latency percentiles.
-- BENCH_TOKEN: the token (never written anywhere); BENCH_CLOSE=1: a new connection per request.
wrk.method = "POST"
wrk.path = "/workflow"
wrk.body = '{"name": "echo", "elements": ["hello"]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. assert(os.getenv("BENCH_TOKEN"), "BENCH_TOKEN is not set")
if os.getenv("BENCH_CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, ' ..
    '"connect": %d, "read": %d, "write": %d, "timeout": %d, "status": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, e.status))
end
