-- wrk script of bench/serving.py: one run against one endpoint, results as one JSON line.
--
--   wrk -t T -c C -d 15s --latency --timeout 60s -s bench/serving_wrk.lua URL -- \
--       mode=cold threads=T ids=FILE start=N per=K template=JSON [item=JSON]
--
-- mode=get    GET the URL (the floor: BentoML's /livez)
-- mode=fixed  POST `template` with @ID@ replaced by `id=` on every request (the warm run)
-- mode=cold   POST a different enterprise id on every request: thread t (0-based) of T sends its
--             i-th request with the ids at positions start + (t + T*i) * per ... + per - 1 of the
--             file `ids` (one id a line, wrapping around), so no id repeats within a run until
--             the file is used up. per > 1 (/screen): `template` holds @ITEMS@, replaced by `per`
--             copies of `item` (each with its own @ID@) joined by commas.
-- done() prints `BENCH_JSON {...}`: requests, errors by kind, non-2xx answers counted in
-- response(), latency percentiles in microseconds, how many requests each thread sent (so the
-- caller knows which ids were used) and the first non-2xx answer, cut to 300 characters.

local threads = {}
local thread_count = 0

function setup(thread)
   thread:set("tid", thread_count)
   thread_count = thread_count + 1
   table.insert(threads, thread)
end

local function options(args)
   local o = {}
   for _, a in ipairs(args) do
      local k, v = a:match("^([%w_]+)=(.*)$")
      if k then o[k] = v end
   end
   return o
end

local function split(template, marker)
   local i, j = template:find(marker, 1, true)
   if not i then error("template lacks " .. marker .. ": " .. template) end
   return template:sub(1, i - 1), template:sub(j + 1)
end

sent, non2xx, first_error = 0, 0, ""
local mode, per, start, nthreads = "get", 1, 0, 1
local ids, n = {}, 0
local prefix, suffix, item_prefix, item_suffix, fixed_body
local headers = {["Content-Type"] = "application/json"}
local items = {}

function init(args)
   local o = options(args)
   mode = o.mode or "get"
   per = tonumber(o.per or "1")
   start = tonumber(o.start or "0")
   nthreads = tonumber(o.threads or "1")
   if mode == "fixed" then
      local p, s = split(o.template, "@ID@")
      fixed_body = p .. o.id .. s
   elseif mode == "cold" then
      for line in io.lines(o.ids) do
         if #line > 0 then
            n = n + 1
            ids[n] = line
         end
      end
      if per > 1 then
         prefix, suffix = split(o.template, "@ITEMS@")
         item_prefix, item_suffix = split(o.item, "@ID@")
      else
         prefix, suffix = split(o.template, "@ID@")
      end
   end
end

function request()
   local body
   if mode == "get" then
      sent = sent + 1
      return wrk.format("GET")
   elseif mode == "fixed" then
      body = fixed_body
   elseif per == 1 then
      body = prefix .. ids[(start + tid + nthreads * sent) % n + 1] .. suffix
   else
      local base = start + (tid + nthreads * sent) * per
      for j = 1, per do
         items[j] = item_prefix .. ids[(base + j - 1) % n + 1] .. item_suffix
      end
      body = prefix .. table.concat(items, ",") .. suffix
   end
   sent = sent + 1
   return wrk.format("POST", nil, headers, body)
end

function response(status, headers, body)
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
      if first_error == "" then
         first_error = status .. " " .. string.sub(body or "", 1, 300)
      end
   end
end

local function json_string(s)
   return '"' .. s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
   local total_non2xx, sent_per_thread, sample = 0, {}, ""
   for _, t in ipairs(threads) do
      total_non2xx = total_non2xx + (t:get("non2xx") or 0)
      table.insert(sent_per_thread, string.format("%d", t:get("sent") or 0))
      local e = t:get("first_error") or ""
      if sample == "" then sample = e end
   end
   local e = summary.errors
   local fields = {
      string.format('"requests":%d', summary.requests),
      string.format('"duration_us":%d', summary.duration),
      string.format('"bytes":%d', summary.bytes),
      string.format('"connect_errors":%d', e.connect),
      string.format('"read_errors":%d', e.read),
      string.format('"write_errors":%d', e.write),
      string.format('"timeouts":%d', e.timeout),
      string.format('"status_errors":%d', e.status),
      string.format('"non2xx":%d', total_non2xx),
      '"sent_per_thread":[' .. table.concat(sent_per_thread, ",") .. "]",
      string.format('"latency_min_us":%.0f', summary.requests > 0 and latency.min or 0),
      string.format('"latency_mean_us":%.1f', summary.requests > 0 and latency.mean or 0),
      string.format('"latency_max_us":%.0f', latency.max),
      string.format('"p50_us":%.0f', latency:percentile(50)),
      string.format('"p95_us":%.0f', latency:percentile(95)),
      string.format('"p99_us":%.0f', latency:percentile(99)),
      '"first_error":' .. json_string(sample),
   }
   io.write("BENCH_JSON {" .. table.concat(fields, ",") .. "}\n")
end
