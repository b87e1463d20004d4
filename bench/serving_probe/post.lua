-- wrk script: POST the JSON body in $WRK_BODY (or a default row) and, at the end, print a
-- JSON line with exact counts from wrk's latency histogram (values in microseconds).
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("WRK_BODY") or '{"rows": [[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]]}'
local stall_us = tonumber(os.getenv("WRK_STALL_US") or "50000")

done = function(summary, latency, requests)
   local stalls = 0
   local n = #latency
   -- latency[i] is (value, count) of the i-th distinct recorded latency in wrk 4.x
   for i = 1, n do
      local v, c = latency(i)
      if v ~= nil and c ~= nil and v > stall_us then stalls = stalls + c end
   end
   local e = summary.errors
   io.write(string.format(
      '{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f, "stalls": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      latency.max, latency.mean, stalls, e.connect, e.read, e.write, e.status, e.timeout))
end
