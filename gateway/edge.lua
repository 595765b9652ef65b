-- agentmesh edge filter (envoy.filters.http.lua), first in envoy.yaml's filter chain, so on the
-- way back it sees responses after the gRPC-JSON transcoder. For REST calls it:
--   * turns a transcoded google.rpc.Status body ({"code":5,"message":...,"details":[ErrorInfo]})
--     into the documented envelope {"error":{"code","message","details","timestamp","request_id"}},
--     with ErrorInfo.reason as the code and ErrorInfo.metadata as the details;
--   * applies the x-http-status header a server sets for 201, 204 or 503 (servers/common/context.py);
--   * adds Retry-After to 429 answers, from the error's details.retry_after;
--   * drops gRPC-only headers (a REST request's too);
--   * answers the deprecated unversioned /api/* paths with seed 000's deprecation headers;
--   * names the agent of an /api/v1/agents/{agent_id}/... request in AGENT_HEADER, which the
--     agents routes hash on (envoy.yaml), so that an HTTP agent's calls and its assignment
--     stream all reach the one agents replica that holds its session;
--   * in its second place (EDGE_ROLE "body_fields"; after the buffer filter, whose 1 MiB
--     limit its body() then has, not the 32 KiB per-connection one, and before the transcoder),
--     refuses (400 VALIDATION_ERROR) a body that is not strict JSON, which protobuf's lenient
--     parser would read anyway, or one with a top-level field its route's request does not
--     have, which the transcoder would drop without a word, or with a lone value for a list
--     field, which it would take for a list of one (body_problem has the whole list); a body
--     on a route that takes none; a query parameter that would override what the path says
--     (query_problem); and refuses (431) request headers larger than the servers take.
--     gateway/proxy.py writes that copy of this script with ROUTES (gateway/fields.py),
--     SERVER_METADATA_LIMIT and EDGE_ROLE in front.
-- For gRPC calls it gives a caller whose token jwt_authn refused the ErrorInfo a server would.
-- What is REST and what is gRPC is decided as Envoy decides it (is_grpc below).
-- Envoy's own errors are shaped by local_reply_config in envoy.yaml, not here.
-- The Status JSON comes from protobuf's printer, so its field order is fixed: code, message,
-- details; inside ErrorInfo: @type, reason, domain, metadata.

local DEPRECATION_DATE = "2027-06-30"
local NS = "agentmesh.edge"
local AGENT_HEADER = "x-agentmesh-agent"
-- Set by envoy.yaml's local_reply_config on a gRPC caller's refusal at the edge (jwt_authn): the
-- documented code, which envoy_on_response turns into grpc-status-details-bin.
local REASON_HEADER = "x-agentmesh-reason"
-- With it, the gRPC status the refusal is to have instead of Envoy's mapping of its HTTP one.
local GRPC_STATUS_HEADER = "x-agentmesh-grpc-status"
-- The unversioned paths (seed 001) whose successor is not their twin under /api/v1/ (all the
-- others are). tests/gateway/test_fields.py holds this table to the contract.
local SUCCESSOR_EXCEPTIONS = {
  ["/api/observability/events/stream"] = "/api/v1/events/stream",
}

-- Codes for errors that carry no ErrorInfo (raised by gRPC itself, e.g. a deadline).
local CODE_BY_STATUS = {
  [400] = "VALIDATION_ERROR", [401] = "AUTH_REQUIRED", [403] = "INSUFFICIENT_PERMISSIONS",
  [404] = "NOT_FOUND", [409] = "CONFLICT", [429] = "RATE_LIMIT_EXCEEDED",
  [499] = "CANCELLED", [501] = "NOT_IMPLEMENTED", [503] = "SERVICE_UNAVAILABLE", [504] = "TIMEOUT_ERROR",
}

-- Index of the quote closing the JSON string that opens at s[i].
local function string_end(s, i)
  local j = i + 1
  local n = #s
  while j <= n do
    local c = s:byte(j)
    if c == 92 then        -- backslash: skip the escaped character
      j = j + 2
    elseif c == 34 then    -- closing quote
      return j
    else
      j = j + 1
    end
  end
  return nil
end

-- The raw JSON string literal (quotes included) of the first "name":"..." in s.
local function raw_string(s, name)
  local k = s:find('"' .. name .. '":"', 1, true)
  if not k then return nil end
  local open = k + #name + 3
  local close = string_end(s, open)
  return close and s:sub(open, close) or nil
end

-- The raw JSON object of the first "name":{...} in s; it holds only strings (map<string,string>).
local function raw_object(s, name)
  local k = s:find('"' .. name .. '":{', 1, true)
  if not k then return nil end
  local open = k + #name + 3
  local j = open + 1
  while j <= #s do
    local c = s:byte(j)
    if c == 34 then
      local close = string_end(s, j)
      if not close then return nil end
      j = close + 1
    elseif c == 125 then   -- closing brace
      return s:sub(open, j)
    else
      j = j + 1
    end
  end
  return nil
end

local function json_quote(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

-- The gRPC rule of Envoy's transcoder and codecs (Grpc::Common::hasGrpcContentType): exactly
-- application/grpc, or application/grpc+<codec>. Anything else, application/grpc-web+json and
-- application/grpc;charset=... included, is transcoded as REST, and shaped here as REST.
local function is_grpc(ctype)
  return ctype == "application/grpc" or ctype:sub(1, 17) == "application/grpc+"
end

-- The escapes RFC 8259 allows after a backslash, but for \u, which takes four hex digits.
local ESCAPES = {[34] = true, [92] = true, [47] = true, [98] = true, [102] = true,
                 [110] = true, [114] = true, [116] = true}
-- Deeper than this the transcoder's parser fails anyway (docs/api.md: protobuf stops at 100);
-- the bound keeps this scanner's stack small.
local MAX_DEPTH = 128
local NOT_SPACE = "[^ \t\n\r]"   -- JSON has these four whitespace bytes

-- Index just past the RFC 8259 string that opens at s[i]; or nil, the index of the fault and
-- what it is (nothing when the body ends first).
local function json_string_end(s, i)
  local j = i + 1
  while true do
    local k = s:find('["\\%z\1-\31]', j)
    if not k then return nil, #s + 1 end
    local c = s:byte(k)
    if c == 34 then return k + 1 end
    if c ~= 92 then return nil, k, "a control character in a string (escape it)" end
    local e = s:byte(k + 1)
    if e == 117 then                    -- \uXXXX
      if not s:find("^%x%x%x%x", k + 2) then return nil, k, "a bad \\u escape" end
      j = k + 6
    elseif e and ESCAPES[e] then
      j = k + 2
    else
      return nil, k, "a bad escape in a string"
    end
  end
end

-- Index just past the RFC 8259 number that starts at s[i] (-?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?),
-- or nil.
local function number_end(s, i)
  local j = i
  if s:byte(j) == 45 then j = j + 1 end
  local c = s:byte(j)
  if c == 48 then
    j = j + 1
  elseif c and c >= 49 and c <= 57 then
    j = select(2, s:find("^%d+", j)) + 1
  else
    return nil
  end
  if s:byte(j) == 46 then
    local _, e = s:find("^%d+", j + 1)
    if not e then return nil end
    j = e + 1
  end
  c = s:byte(j)
  if c == 101 or c == 69 then
    j = j + 1
    c = s:byte(j)
    if c == 43 or c == 45 then j = j + 1 end
    local _, e = s:find("^%d+", j)
    if not e then return nil end
    j = e + 1
  end
  return j
end

local LITERALS = {[116] = "true", [102] = "false", [110] = "null"}

local function not_json(s, i, what)
  local c = s:byte(i)
  if not what then
    if not c then
      what = "it ends too soon"
    elseif c >= 32 and c < 127 then
      what = "unexpected " .. json_quote(string.char(c))
    else
      what = string.format("unexpected byte 0x%02X", c)
    end
  end
  return "the request body is not valid JSON (RFC 8259): " .. what .. " at byte " .. i
end

-- What is wrong with the body s, as the message of a 400, or nil: s must be strict JSON (RFC
-- 8259; protobuf's own parser is lenient: single quotes, bare keys, trailing commas), with no
-- key twice in one object (RFC 8259 leaves the outcome open: protobuf's parser takes the last
-- of two strings, merges two objects and joins two lists); and when it is an object and
-- `known` is given (known[key] == "list:proto_name" or "value:proto_name"), each top-level key
-- must be one that `known` has, no field may come in both its spellings, and a list field
-- must be given an array (or null) of values, not a lone value (protobuf's parser would take
-- it for a list of one) nor arrays or nulls inside (it would flatten the one and drop the
-- other). Bad JSON anywhere is told before a bad field. A body that is valid JSON but not an
-- object is left to the transcoder, which refuses it. Keys written with escapes are compared
-- as written.
-- One pass, without recursion: `stack` holds the bracket of each open object or array, and
-- `keys` the keys seen in each open object.
local function body_problem(s, known)
  local stack, keys, depth = {}, {}, 0
  local field_problem = nil
  local want = "value"   -- "value", "key" (after "{" or ","), "next" ("," or a close)
  local first = false    -- right after "{" or "[", which may close at once
  local list_key = nil   -- the top-level list field whose value comes next
  local list_at = nil    -- the depth of that field's array, while it is open
  local list_name = nil  -- and its name, quoted
  local fields = {}      -- the proto names of the top-level fields given so far
  local i = 1
  while true do
    i = s:find(NOT_SPACE, i)
    if not i then
      if want == "next" and depth == 0 then return field_problem end
      return not_json(s, #s + 1)
    end
    local c = s:byte(i)
    if want == "next" then
      if depth == 0 then return not_json(s, i) end
      local open = stack[depth]
      if c == 44 then                                          -- ,
        want = open == 123 and "key" or "value"
        first = false
        i = i + 1
      elseif (c == 125 and open == 123) or (c == 93 and open == 91) then
        if list_at == depth then list_at = nil end
        stack[depth], keys[depth] = nil, nil
        depth = depth - 1
        i = i + 1
      else
        return not_json(s, i)
      end
    elseif want == "key" then
      if c == 125 and first then                               -- {}
        stack[depth], keys[depth] = nil, nil
        depth = depth - 1
        want = "next"
        i = i + 1
      elseif c ~= 34 then
        return not_json(s, i)
      else
        local close, fault, what = json_string_end(s, i)
        if not close then return not_json(s, fault, what) end
        local key = s:sub(i + 1, close - 2)
        if keys[depth][key] and not field_problem then
          field_problem = "the key " .. json_quote(key:sub(1, 64))
            .. " comes twice in one object of the request body"
        end
        keys[depth][key] = true
        if depth == 1 and known and not field_problem then
          local kind, name = (known[key] or ""):match("^(%a+):(.*)$")
          local quoted = json_quote(key:sub(1, 64))
          if not kind then
            field_problem = "unknown field " .. quoted .. " in the request body"
          elseif fields[name] then
            field_problem = "the field " .. json_quote(name) .. " comes twice in the request"
              .. " body (in its two spellings)"
          end
          fields[name or ""] = true
          list_key = kind == "list" and quoted or nil
        end
        i = s:find(NOT_SPACE, close)
        if not i then return not_json(s, #s + 1) end
        if s:byte(i) ~= 58 then return not_json(s, i) end     -- :
        want = "value"
        first = false
        i = i + 1
      end
    else
      local opens_list = nil
      if list_key then
        if c ~= 91 and s:sub(i, i + 3) ~= "null" then
          field_problem = field_problem or list_key .. " must be a JSON array"
        end
        opens_list, list_key = list_key, nil
      elseif list_at == depth and not field_problem and not (c == 93 and first)
          and (c == 91 or s:sub(i, i + 3) == "null") then
        field_problem = list_name .. " must be an array of values, not of arrays or nulls"
      end
      if c == 123 or c == 91 then                              -- { or [
        if depth == MAX_DEPTH then
          return "the request body nests too deep: more than " .. MAX_DEPTH
            .. " levels of objects and arrays"
        end
        depth = depth + 1
        stack[depth] = c
        if c == 123 then keys[depth] = {} end
        if opens_list and c == 91 then list_at, list_name = depth, opens_list end
        want = c == 123 and "key" or "value"
        first = true
        i = i + 1
      elseif c == 93 and first then                            -- []
        if list_at == depth then list_at = nil end
        stack[depth] = nil
        depth = depth - 1
        want = "next"
        i = i + 1
      else
        local stop
        if c == 34 then
          local fault, what
          stop, fault, what = json_string_end(s, i)
          if not stop then return not_json(s, fault, what) end
        elseif LITERALS[c] then
          local word = LITERALS[c]
          if s:sub(i, i + #word - 1) ~= word then return not_json(s, i) end
          stop = i + #word
        else
          stop = number_end(s, i)
          if not stop then return not_json(s, i) end
        end
        i = stop
        want = "next"
      end
    end
  end
end

-- The route of a REST request (ROUTES, gateway/fields.py: {verb, pattern, body, names,
-- bound fields}), or nil when the transcoder has none for it (which it answers itself).
local function route_of(method, path)
  if ROUTES == nil then return nil end
  for _, route in ipairs(ROUTES) do
    if route[1] == method and path:match(route[2]) then return route end
  end
  return nil
end

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- What is wrong with the query string q of a request on `route`, or nil. The transcoder sets a
-- field from a query parameter of its name (or of a dotted path into it) even when the path or
-- the body binds that field, so that `DELETE /api/v1/tasks/A?task_id=B` cancels B while Envoy's
-- log and every check on the path say A. A route whose body is "*" has every field in its
-- body, and takes no query parameter at all. Unknown names are the transcoder's to refuse.
local function query_problem(q, route)
  local given = {}
  for pair in q:gmatch("[^&]+") do
    local name = unescape(pair:match("^[^=]*"))
    local field = name:match("^[^.]*")
    if route[3] == "*" then
      return "this call takes no query parameters (" .. json_quote(name:sub(1, 64))
        .. "): its fields go in the JSON body"
    end
    if route[5][field] then
      return "the query parameter " .. json_quote(field:sub(1, 64)) .. " names a field"
        .. " the path sets; it cannot be given again"
    end
    -- A value field named twice (?limit=1&limit=2, or in both spellings): the transcoder
    -- would take the last, while the client's own tools may read the first.
    local kind = route[6][field]
    if kind and kind:sub(1, 5) == "value" then
      local key = kind .. name:sub(#field + 1)
      if given[key] then
        return "the query parameter " .. json_quote(name:sub(1, 64)) .. " is given twice"
          .. " (or in both spellings); give it once"
      end
      given[key] = true
    end
  end
  return nil
end

-- The request's metadata as a gRPC server counts it (HPACK: name, value and 32 bytes for each
-- header), with what Envoy adds after this filter: the transcoder repeats a REST path in
-- x-envoy-original-path, and its other headers and the router's (the gRPC :path,
-- content-type, te, x-envoy-original-method, x-envoy-expected-rq-timeout-ms) take less than
-- 512 bytes.
local function metadata_size(headers, rest)
  local size = 512
  for name, value in pairs(headers) do
    size = size + #name + #value + 32
  end
  if rest then size = size + #(headers:get(":path") or "") end
  return size
end

local function check_request(handle)
  local headers = handle:headers()
  local rest = not is_grpc(headers:get("content-type") or "")
  -- SERVER_METADATA_LIMIT (gateway/proxy.py) is what a server surely takes. Past it gRPC
  -- refuses a call with RESOURCE_EXHAUSTED, at random up to its hard limit, which REST would
  -- see as a 429 to retry: the edge refuses it first, always, as a gRPC server would for gRPC.
  if SERVER_METADATA_LIMIT and metadata_size(headers, rest) > SERVER_METADATA_LIMIT then
    local message = "the request headers are too large"
    if rest then
      -- envoy.yaml's local_reply_config says how large they may be.
      handle:respond({[":status"] = "431", ["content-type"] = "text/plain"}, message)
    else
      handle:respond({[":status"] = "200", ["content-type"] = "application/grpc",
                      ["grpc-status"] = "8", ["grpc-message"] = message .. ": at most "
                      .. SERVER_METADATA_LIMIT .. " bytes, 32 more for each entry"}, "")
    end
    return
  end
  if not rest then return end
  local method = headers:get(":method") or ""
  local path, query = (headers:get(":path") or ""):match("^([^?]*)%??(.*)$")
  local route = route_of(method, path)
  if not route then return end
  -- A local reply: envoy.yaml's local_reply_config turns it into the error envelope.
  local function refuse(problem)
    handle:respond({[":status"] = "400", ["content-type"] = "text/plain"}, problem)
  end
  local problem = query ~= "" and query_problem(query, route) or nil
  if problem then return refuse(problem) end
  -- body() waits for the whole request (the buffer filter before has it, 1 MiB at most).
  local body = handle:body()
  if not body or body:length() == 0 then return end
  if route[3] == "none" then
    return refuse(method .. " " .. path:sub(1, 200) .. " takes no request body")
  end
  problem = body_problem(body:getBytes(0, body:length()), route[4] or nil)
  if problem then return refuse(problem) end
end

function envoy_on_request(handle)
  if EDGE_ROLE == "body_fields" then
    return check_request(handle)
  end
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
  local ctype = headers:get("content-type") or ""
  local rest = not is_grpc(ctype)
  meta:set(NS, "rest", rest)
  meta:set(NS, "request_id", headers:get("x-request-id") or "")
  local path = headers:get(":path") or ""
  if rest and path:sub(1, 5) == "/api/" and path:sub(1, 8) ~= "/api/v1/" then
    local bare = path:gsub("%?.*$", "")
    meta:set(NS, "successor", SUCCESSOR_EXCEPTIONS[bare] or "/api/v1/" .. bare:sub(6))
  end
  -- Only the edge says which agent a request is for.
  headers:remove(AGENT_HEADER)
  if rest then
    -- gRPC's own headers are the transcoder's to write. A REST client's grpc-timeout reached
    -- the server as the call's deadline: a task could be created behind the 504 that its
    -- client saw, and a malformed one was a 500.
    local grpc_headers = {}
    for name, _ in pairs(headers) do
      if name:sub(1, 5) == "grpc-" then grpc_headers[#grpc_headers + 1] = name end
    end
    for _, name in ipairs(grpc_headers) do headers:remove(name) end
    local agent = path:match("^/api/v1/agents/([%w%-]+)")
    if agent and #agent <= 64 and agent ~= "register" then
      headers:add(AGENT_HEADER, agent)
    end
  end
end

-- Protocol Buffers' wire format, for the one message the edge writes (google.rpc.Status).
local function varint(n)
  local out = {}
  repeat
    local byte = n % 128
    n = (n - byte) / 128
    out[#out + 1] = string.char(n > 0 and byte + 128 or byte)
  until n == 0
  return table.concat(out)
end

local function pb_varint(field, n) return varint(field * 8) .. varint(n) end
local function pb_bytes(field, s) return varint(field * 8 + 2) .. varint(#s) .. s end

local function percent_decoded(s)
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- A google.rpc.Status with an ErrorInfo of `reason`, as the servers send it: its code and
-- message are the call's own (grpc-status, grpc-message), which gRPC clients check.
local function status_details(code, message, reason)
  local info = pb_bytes(1, reason) .. pb_bytes(2, "agentmesh")
  local any = pb_bytes(1, "type.googleapis.com/google.rpc.ErrorInfo") .. pb_bytes(2, info)
  local status = (code > 0 and pb_varint(1, code) or "")
    .. (message ~= "" and pb_bytes(2, message) or "") .. pb_bytes(3, any)
  return status
end

-- A gRPC caller's refusal at the edge gets the ErrorInfo a server's would have.
local function grpc_response(handle)
  local headers = handle:headers()
  local reason = headers:get(REASON_HEADER)
  if not reason then return end
  headers:remove(REASON_HEADER)
  local status = headers:get(GRPC_STATUS_HEADER)
  if status then
    headers:remove(GRPC_STATUS_HEADER)
    headers:replace("grpc-status", status)
  end
  local code = tonumber(headers:get("grpc-status") or "")
  if not code or code == 0 or headers:get("grpc-status-details-bin") then return end
  local message = percent_decoded(headers:get("grpc-message") or "")
  local encoded = handle:base64Escape(status_details(code, message, reason))
  headers:add("grpc-status-details-bin", (encoded:gsub("=+$", "")))
end

function envoy_on_response(handle)
  if EDGE_ROLE == "body_fields" then
    return
  end
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if not meta then
    return
  end
  if not meta["rest"] then
    return grpc_response(handle)
  end
  handle:headers():remove(REASON_HEADER)
  handle:headers():remove(GRPC_STATUS_HEADER)
  local headers = handle:headers()
  local wanted = headers:get("x-http-status")
  if wanted then
    headers:remove("x-http-status")
    if headers:get(":status") == "200" and wanted:match("^[1-5]%d%d$") then
      headers:replace(":status", wanted)
      if wanted == "204" then
        -- No Content: drop the transcoded "{}" and its headers. body() ends the life of the
        -- header handle taken before it, so take a fresh one.
        local empty = handle:body()
        if empty then empty:setBytes("") end
        headers = handle:headers()
        headers:remove("content-type")
        headers:remove("content-length")
      end
    end
  end
  headers:remove("grpc-status")
  headers:remove("grpc-message")
  headers:remove("grpc-accept-encoding")
  headers:remove("grpc-status-details-bin")
  if meta["successor"] then
    headers:add("x-api-deprecation-date", DEPRECATION_DATE)
    headers:add("x-api-deprecation-info", "use " .. meta["successor"] .. " (see docs/api.md)")
  end

  local status = tonumber(headers:get(":status")) or 0
  local ctype = headers:get("content-type") or ""
  if status < 400 or ctype:sub(1, 16) ~= "application/json" then
    return
  end
  local body = handle:body()
  if not body then return end
  local text = body:getBytes(0, body:length())
  -- Only transcoded google.rpc.Status bodies; Envoy's own envelopes start with {"error".
  if not text:match('^{"code":%d+') then
    return
  end
  local reason = text:match('"reason":"([A-Z0-9_]+)"')
  local code = reason or CODE_BY_STATUS[status] or "INTERNAL_ERROR"
  local message = raw_string(text, "message") or '""'
  local details = raw_object(text, "metadata") or "{}"
  local envelope = '{"error":{"code":' .. json_quote(code)
    .. ',"message":' .. message
    .. ',"details":' .. details
    .. ',"timestamp":' .. json_quote(os.date("!%Y-%m-%dT%H:%M:%SZ"))
    .. ',"request_id":' .. json_quote(meta["request_id"] or "")
    .. "}}"
  body:setBytes(envelope)
  -- body() ended the life of the earlier header handle; setBytes set content-length.
  headers = handle:headers()
  if code == "RATE_LIMIT_EXCEEDED" then
    local retry = details:match('"retry_after":"(%d+)"')
    if retry then headers:replace("retry-after", retry) end
  end
end
