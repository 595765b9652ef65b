-- agentmesh edge filter (envoy.filters.http.lua), first in envoy.yaml's filter chain, so on the
-- way back it sees responses after the gRPC-JSON transcoder. For REST calls it:
--   * turns a transcoded google.rpc.Status body ({"code":5,"message":...,"details":[ErrorInfo]})
--     into the documented envelope {"error":{"code","message","details","timestamp","request_id"}},
--     with ErrorInfo.reason as the code and ErrorInfo.metadata as the details;
--   * applies the x-http-status header a server sets for 201, 204 or 503 (servers/common/context.py);
--   * adds Retry-After to 429 answers, from the error's details.retry_after;
--   * drops gRPC-only headers;
--   * answers the deprecated unversioned /api/* paths with seed 000's deprecation headers;
--   * names the agent of an /api/v1/agents/{agent_id}/... request in AGENT_HEADER, which the
--     agents routes hash on (envoy.yaml), so that an HTTP agent's calls and its assignment
--     stream all reach the one agents replica that holds its session;
--   * in its second place (EDGE_ROLE "body_fields"; after the buffer filter, whose 1 MiB
--     limit its body() then has, not the 32 KiB per-connection one, and before the transcoder),
--     refuses a JSON body with a top-level field its route's request does not have (400
--     VALIDATION_ERROR), which the transcoder would drop without a word, or with a lone value
--     for a list field, which it would take for a list of one. gateway/proxy.py writes
--     that copy of this script with BODY_FIELDS (gateway/fields.py) and EDGE_ROLE in front.
-- Envoy's own errors are shaped by local_reply_config in envoy.yaml, not here.
-- The Status JSON comes from protobuf's printer, so its field order is fixed: code, message,
-- details; inside ErrorInfo: @type, reason, domain, metadata.

local DEPRECATION_DATE = "2027-06-30"
local NS = "agentmesh.edge"
local AGENT_HEADER = "x-agentmesh-agent"

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

-- Index just past the JSON value that starts at or after s[i] (nil when s ends first).
local function value_end(s, i)
  i = s:find("[^ \t\r\n]", i)
  if not i then return nil end
  local c = s:byte(i)
  if c == 34 then
    local close = string_end(s, i)
    return close and close + 1
  elseif c == 123 or c == 91 then    -- { or [: to the bracket that closes it
    local depth, j = 0, i
    while true do
      j = s:find('[{}%[%]"]', j)
      if not j then return nil end
      local b = s:byte(j)
      if b == 34 then
        j = string_end(s, j)
        if not j then return nil end
      elseif b == 123 or b == 91 then
        depth = depth + 1
      else
        depth = depth - 1
        if depth == 0 then return j + 1 end
      end
      j = j + 1
    end
  end
  local stop = s:find("[,}%]]", i)    -- a number, true, false or null
  return stop
end

-- What is wrong with the top level of the JSON object s, as the message of a 400: a key that
-- `known` lacks, or a list field (known[key] == "list") given something other than an array
-- (protobuf's parser would take a lone value for a list of one). nil when nothing is, or when
-- s is not an object this scanner follows (the transcoder then says why).
local function body_problem(s, known)
  local i = s:find("[^ \t\r\n]")
  if not i or s:byte(i) ~= 123 then return nil end
  i = i + 1
  while true do
    i = s:find("[^ \t\r\n]", i)
    if not i then return nil end
    local c = s:byte(i)
    if c == 125 then return nil end           -- }
    if c ~= 34 then return nil end
    local close = string_end(s, i)
    if not close then return nil end
    local key = s:sub(i + 1, close - 1)
    local kind = known[key]
    local quoted = json_quote(key:sub(1, 64))
    if not kind then return "unknown field " .. quoted .. " in the request body" end
    i = s:find(":", close + 1, true)
    if not i then return nil end
    i = s:find("[^ \t\r\n]", i + 1)
    if not i then return nil end
    if kind == "list" and s:byte(i) ~= 91 and s:sub(i, i + 3) ~= "null" then
      return quoted .. " must be a JSON array"
    end
    i = value_end(s, i)
    if not i then return nil end
    i = s:find("[^ \t\r\n]", i)
    if not i then return nil end
    if s:byte(i) == 44 then i = i + 1 end     -- ,
  end
end

local BODY_METHODS = {POST = true, PUT = true, PATCH = true}

-- The fields a REST request's body may have (BODY_FIELDS), or nil when it is not checked.
local function body_rule(method, path)
  if not BODY_METHODS[method] or BODY_FIELDS == nil then return nil end
  path = path:gsub("%?.*$", "")
  for _, rule in ipairs(BODY_FIELDS) do
    if rule[1] == method and path:match(rule[2]) then return rule[3] end
  end
  return nil
end

local function check_body(handle)
  local headers = handle:headers()
  local ctype = headers:get("content-type") or ""
  if ctype:sub(1, 16) == "application/grpc" then return end
  local known = body_rule(headers:get(":method") or "", headers:get(":path") or "")
  if not known then return end
  -- body() waits for the whole request (the buffer filter before has it, 1 MiB at most).
  local body = handle:body()
  if not body or body:length() == 0 then return end
  local problem = body_problem(body:getBytes(0, body:length()), known)
  if problem then
    -- A local reply: envoy.yaml's local_reply_config turns it into the error envelope.
    handle:respond({[":status"] = "400", ["content-type"] = "text/plain"}, problem)
  end
end

function envoy_on_request(handle)
  if EDGE_ROLE == "body_fields" then
    return check_body(handle)
  end
  local headers = handle:headers()
  local meta = handle:streamInfo():dynamicMetadata()
  local ctype = headers:get("content-type") or ""
  local rest = ctype:sub(1, 16) ~= "application/grpc"
  meta:set(NS, "rest", rest)
  meta:set(NS, "request_id", headers:get("x-request-id") or "")
  local path = headers:get(":path") or ""
  if rest and path:sub(1, 5) == "/api/" and path:sub(1, 8) ~= "/api/v1/" then
    meta:set(NS, "successor", "/api/v1/" .. path:sub(6):gsub("%?.*$", ""))
  end
  -- Only the edge says which agent a request is for.
  headers:remove(AGENT_HEADER)
  if rest then
    local agent = path:match("^/api/v1/agents/([%w%-]+)")
    if agent and #agent <= 64 and agent ~= "register" then
      headers:add(AGENT_HEADER, agent)
    end
  end
end

function envoy_on_response(handle)
  if EDGE_ROLE == "body_fields" then
    return
  end
  local meta = handle:streamInfo():dynamicMetadata():get(NS)
  if not meta or not meta["rest"] then
    return
  end
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
