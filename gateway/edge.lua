-- agentmesh edge filter (envoy.filters.http.lua), first in envoy.yaml's filter chain, so on the
-- way back it sees responses after the gRPC-JSON transcoder. For REST calls it:
--   * turns a transcoded google.rpc.Status body ({"code":5,"message":...,"details":[ErrorInfo]})
--     into the documented envelope {"error":{"code","message","details","timestamp","request_id"}},
--     with ErrorInfo.reason as the code and ErrorInfo.metadata as the details;
--   * applies the x-http-status header a server sets for 201, 204 or 503 (servers/common/context.py);
--   * adds Retry-After to 429 answers, from the error's details.retry_after;
--   * drops gRPC-only headers;
--   * answers the deprecated unversioned /api/* paths with seed 000's deprecation headers.
-- Envoy's own errors are shaped by local_reply_config in envoy.yaml, not here.
-- The Status JSON comes from protobuf's printer, so its field order is fixed: code, message,
-- details; inside ErrorInfo: @type, reason, domain, metadata.

local DEPRECATION_DATE = "2027-06-30"
local NS = "agentmesh.edge"

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

function envoy_on_request(handle)
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
end

function envoy_on_response(handle)
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
