-- wrk script for bench/http_kv.py: KV puts and gets against konsul or etcd.
--
--   wrk -t1 -c64 -d10s -s bench/wrk/kv.lua http://127.0.0.1:PORT -- TARGET OP PREFIX KEYS [TOKEN]
--
-- TARGET  konsul: PUT /v1/kv/<key> (raw body), GET /v1/kv/<key>; konsul-noacl the same
--         (TOKEN, a fifth argument, is sent as X-Consul-Token)
--         etcd:   POST /v3/kv/put {"key","value"} and POST /v3/kv/range {"key"}
--                 (the v3 JSON gateway; keys and values base64)
-- OP      put: every request writes a new key <PREFIX>/<thread>/<n> with a
--              ~100-byte value (so no two requests touch the same key);
--         get: request n reads key <PREFIX>/<n mod KEYS>, which the caller
--              wrote beforehand.
--
-- The response hook counts every answer that is not a 200, or whose body does
-- not show success (konsul PUT: "true"; etcd range: a "kvs" list), and done()
-- prints one line starting with BENCH_RESULT for the caller to parse.

local VALUE_BYTES = 100

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

-- base64 (etcd's gateway wants keys and values as base64 strings) -----------

local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64 = {}
for i = 1, 64 do b64[i - 1] = b64chars:sub(i, i) end

local function base64(s)
   local out = {}
   local n = #s
   for i = 1, n, 3 do
      local a, b, c = s:byte(i, i + 2)
      local v = a * 65536 + (b or 0) * 256 + (c or 0)
      local c1 = math.floor(v / 262144) % 64
      local c2 = math.floor(v / 4096) % 64
      local c3 = math.floor(v / 64) % 64
      local c4 = v % 64
      out[#out + 1] = b64[c1] .. b64[c2]
         .. (b and b64[c3] or "=") .. (c and b64[c4] or "=")
   end
   return table.concat(out)
end

-- per-thread state (init runs in each thread's own Lua state) ---------------

local target, op, prefix, keys
local counter = 0
local put_headers = {}
local get_headers = {}
local json_headers = { ["Content-Type"] = "application/json" }

function init(args)
   target = args[1] or "konsul"
   op = args[2] or "put"
   prefix = args[3] or "bench"
   keys = tonumber(args[4] or "1000")
   -- An ACL token, sent on every konsul request (bench/http_kv.py's "konsul"
   -- target runs with ACLs on; "konsul-noacl" with --acl off and no token).
   local token = args[5] or ""
   if token ~= "" then
      put_headers["X-Consul-Token"] = token
      get_headers["X-Consul-Token"] = token
   end
   if target == "konsul-noacl" or target == "konsul-baseline" then target = "konsul" end
   bad = 0          -- global: read back by done() through thread:get
   bad_status = 0
   responses = 0
   sample = ""
   if target ~= "konsul" and target ~= "etcd" then error("target is konsul or etcd") end
   if op ~= "put" and op ~= "get" then error("op is put or get") end
end

local function value_of(n)
   local head = string.format("%s-%010d-", prefix, n)
   return head .. string.rep(".", VALUE_BYTES - #head)
end

function request()
   counter = counter + 1
   if op == "put" then
      local key = string.format("%s/%d/%d", prefix, id, counter)
      local value = value_of(counter)
      if target == "konsul" then
         return wrk.format("PUT", "/v1/kv/" .. key, put_headers, value)
      end
      return wrk.format("POST", "/v3/kv/put", json_headers,
         '{"key":"' .. base64(key) .. '","value":"' .. base64(value) .. '"}')
   end
   local key = string.format("%s/%d", prefix, counter % keys)
   if target == "konsul" then
      return wrk.format("GET", "/v1/kv/" .. key, get_headers)
   end
   return wrk.format("POST", "/v3/kv/range", json_headers, '{"key":"' .. base64(key) .. '"}')
end

function response(status, headers, body)
   responses = responses + 1
   local ok = status == 200
   if ok then
      if target == "konsul" and op == "put" then
         ok = body == "true"
      elseif target == "etcd" and op == "get" then
         ok = body:find('"kvs"', 1, true) ~= nil
      end
   end
   if not ok then
      bad = bad + 1
      if status ~= 200 then bad_status = bad_status + 1 end
      if sample == "" then sample = tostring(status) .. " " .. body:sub(1, 120) end
   end
end

function done(summary, latency, requests)
   local bad_total, bad_status_total, responses_total, sample = 0, 0, 0, ""
   for _, thread in ipairs(threads) do
      bad_total = bad_total + thread:get("bad")
      bad_status_total = bad_status_total + thread:get("bad_status")
      responses_total = responses_total + thread:get("responses")
      local s = thread:get("sample")
      if sample == "" and s ~= nil then sample = s end
   end
   local e = summary.errors
   io.write(string.format(
      "BENCH_RESULT requests=%d duration_us=%d responses=%d bad=%d bad_status=%d "
         .. "connect=%d read=%d write=%d status=%d timeout=%d "
         .. "p50_us=%d p90_us=%d p99_us=%d max_us=%d sample=%q\n",
      summary.requests, summary.duration, responses_total, bad_total, bad_status_total,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      (sample:gsub("\n", " "))))
end
