-- wrk script for bench/run.py: POST hook bodies in rotation, each with its own bearer token from a pre-signed pool.
-- Arguments (after --): BODIES_FILE TOKENS_PREFIX TOKEN_MODE MAX_REQUESTS
--   BODIES_FILE    one JSON body per line, sent in rotation
--   TOKENS_PREFIX  thread N reads TOKENS_PREFIX.N (one JWT per line); "-" sends no Authorization
--   TOKEN_MODE     rotate: each token is sent once; fixed: the first token every time (a server that ignores it)
--   MAX_REQUESTS   each thread stops after its share of this many requests (0: run for the -d duration) and
--                  prints "BENCH_STOPPED"; wrk itself waits for -d or SIGINT, which run.py sends when all stopped
-- Prints one line "BENCH_JSON {...}" with the counts and latency percentiles (microseconds) for run.py to read.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local function read_lines(path)
   local out = {}
   local f = assert(io.open(path, "r"))
   for line in f:lines() do
      if #line > 0 then out[#out + 1] = line end
   end
   f:close()
   return out
end

function init(args)
   bodies = read_lines(args[1])
   if args[2] ~= "-" then
      tokens = read_lines(args[2] .. "." .. id)
   end
   fixed = args[3] == "fixed"
   limit = math.ceil(tonumber(args[4] or "0") / counter_threads())
   stopped = false
   sent = 0
   exhausted = 0
   headers = {["Content-Type"] = "application/json"}
end

function counter_threads()
   -- setup() ran for every thread before any init(); the count is passed in as a global by run.py's -t.
   return tonumber(os.getenv("BENCH_WRK_THREADS") or "1")
end

function request()
   sent = sent + 1
   if limit > 0 and sent >= limit and not stopped then
      stopped = true
      wrk.thread:stop()
      io.write("BENCH_STOPPED\n")
      io.stdout:flush()
   end
   if tokens then
      local token = fixed and tokens[1] or tokens[sent]
      if token == nil then
         -- The pool ran out: reuse the last token (a replay the service refuses); run.py reports the run invalid.
         exhausted = exhausted + 1
         token = tokens[#tokens]
      end
      headers["Authorization"] = "Bearer " .. token
   end
   return wrk.format("POST", nil, headers, bodies[(sent % #bodies) + 1])
end

function done(summary, latency, requests)
   local exhausted_total = 0
   local sent_total = 0
   for _, thread in ipairs(threads) do
      exhausted_total = exhausted_total + (thread:get("exhausted") or 0)
      sent_total = sent_total + (thread:get("sent") or 0)
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
      '"status": %d, "timeout": %d, "p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f, ' ..
      '"exhausted": %d, "sent": %d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean,
      exhausted_total, sent_total))
end
