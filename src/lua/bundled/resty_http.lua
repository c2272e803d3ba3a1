-- resty.http bundled with tidegate: lua-resty-http's API over hyper connections and a
-- per-worker Rust keepalive pool (src/lua/api/resty_http.rs). The chunk receives the natives
-- as its argument. A copy of lua-resty-http on lua_package_path is loaded instead of this one.
local native = ...

local rawget = rawget
local setmetatable = setmetatable
local type = type
local tonumber = tonumber
local tostring = tostring
local pairs = pairs
local concat = table.concat
local str_lower = string.lower
local str_upper = string.upper
local rawset = rawset
local str_sub = string.sub
local str_find = string.find
local str_match = string.match
local ngx_encode_args = ngx.encode_args

local _M = { _VERSION = "0.17.2" }
_M._USER_AGENT = "lua-resty-http/" .. _M._VERSION .. " (Lua) tidegate"

local mt = { __index = _M }

local HTTP = { [1.0] = " HTTP/1.0\r\n", [1.1] = " HTTP/1.1\r\n" }

function _M.new(_)
    return setmetatable({ _core = native.new(), keepalive = true }, mt)
end

local function core(self)
    return rawget(self, "_core")
end

function _M.set_timeout(self, timeout)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    native.set_timeouts(c, timeout, timeout, timeout)
end

function _M.set_timeouts(self, connect_timeout, send_timeout, read_timeout)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    native.set_timeouts(c, connect_timeout, send_timeout, read_timeout)
end

-- Proxy options are accepted and ignored by the bundled client (see docs/lua-api.md).
function _M.set_proxy_options(_, _) end

function _M.connect(self, options, port, opts2)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    local opts
    if type(options) == "table" then
        opts = options
    else
        -- Legacy form: connect(host, port, options?) or connect("unix:/path", options?).
        opts = {}
        local extra = type(port) == "table" and port or opts2
        if type(extra) == "table" then
            for k, v in pairs(extra) do
                opts[k] = v
            end
        end
        opts.host = options
        if type(port) ~= "table" then
            opts.port = tonumber(port)
        end
        opts.scheme = opts.scheme or "http"
    end
    if opts.scheme == "https" and opts.ssl_verify == nil then
        opts.ssl_verify = true
    end
    self.host = opts.host
    self.port = opts.port or (opts.scheme == "https" and 443 or 80)
    self.ssl = opts.scheme == "https"
    if native.connect_pooled(c, opts) then
        return 1
    end
    local ok, err = native.connect(c, opts)
    if not ok then
        return nil, err
    end
    return ok
end

-- Methods that only check the object and hand it to the native side.
for _, name in ipairs({ "set_keepalive", "get_reused_times", "close" }) do
    local f = native[name]
    _M[name] = function(self, ...)
        local c = core(self)
        if not c then
            return nil, "not initialized"
        end
        return f(c, ...)
    end
end

-- Header tables whose lookups ignore case, like lua-resty-http's resty.http_headers.
local headers_mt = {
    __index = function(t, k)
        if type(k) == "string" then
            return rawget(t, str_lower(k))
        end
    end,
}

local function body_string(body)
    local t = type(body)
    if body == nil or t == "string" then
        return body
    elseif t == "table" then
        return concat(body)
    elseif t == "function" then
        -- An iterator body is collected, then sent with a Content-Length.
        local parts, n = {}, 0
        while true do
            local chunk, err = body()
            if err then
                return nil, err
            end
            if chunk == nil then
                break
            end
            if chunk ~= "" then
                n = n + 1
                parts[n] = chunk
            end
        end
        return concat(parts, "", 1, n)
    end
    return tostring(body)
end

function _M.request(self, params)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    params = params or {}
    local path = params.path or "/"
    local query = params.query or ""
    if type(query) == "table" then
        query = "?" .. ngx_encode_args(query)
    elseif query ~= "" and str_sub(query, 1, 1) ~= "?" then
        query = "?" .. query
    end
    if query == "?" then
        query = ""
    end
    local version = params.version or 1.1
    if not HTTP[version] then
        return nil, "unknown HTTP version"
    end

    local headers = {}
    local has_host, has_ua = false, false
    if params.headers then
        for k, v in pairs(params.headers) do
            local lk = str_lower(k)
            if lk == "host" then
                has_host = true
            elseif lk == "user-agent" then
                has_ua = true
            end
            headers[k] = v
        end
    end
    if not has_host then
        local host, port = self.host or "localhost", self.port
        if str_sub(host, 1, 5) == "unix:" then
            headers["Host"] = "localhost"
        elseif (port == 80 and not self.ssl) or (port == 443 and self.ssl) or port == nil then
            headers["Host"] = host
        else
            headers["Host"] = host .. ":" .. port
        end
    end
    if not has_ua then
        headers["User-Agent"] = _M._USER_AGENT
    end

    local body, err = body_string(params.body)
    if err then
        return nil, err
    end

    local status, reason, res_headers, has_body = native.request(c, {
        method = params.method and str_upper(params.method) or "GET",
        target = path .. query,
        version = version,
        headers = headers,
        body = body,
    })
    if not status then
        return nil, reason
    end
    setmetatable(res_headers, headers_mt)
    local res = {
        status = status,
        reason = reason,
        headers = res_headers,
        has_body = has_body,
    }
    if has_body then
        res.body_reader = function(max_chunk_size)
            return native.read(c, max_chunk_size)
        end
    end
    res.read_body = function(_)
        if not has_body then
            return nil, "no body to be read"
        end
        return native.read_all(c)
    end
    res.read_trailers = function(r)
        local tr = native.trailers(c)
        if tr then
            for k, v in pairs(tr) do
                rawset(r.headers, k, v)
            end
        end
    end
    return res
end

function _M.parse_uri(_, uri, query_in_path)
    if query_in_path == nil then
        query_in_path = true
    end
    local scheme, rest = str_match(uri, "^(https?)://(.*)$")
    if not scheme then
        local r = str_match(uri, "^//(.*)$")
        if r then
            scheme, rest = "http", r
        else
            return nil, "bad uri: " .. uri
        end
    end
    local authority, tail = str_match(rest, "^([^/%?]*)(.*)$")
    local host, port
    if str_sub(authority, 1, 1) == "[" then
        host, port = str_match(authority, "^(%[[^%]]+%])(.*)$")
    else
        host, port = str_match(authority, "^([^:]*)(.*)$")
    end
    if not host or host == "" then
        return nil, "bad uri: " .. uri
    end
    if port and port ~= "" then
        port = tonumber(str_match(port, "^:(%d+)$"))
        if not port then
            return nil, "bad uri: " .. uri
        end
    else
        port = scheme == "https" and 443 or 80
    end
    local path, query = tail, ""
    local q = str_find(tail, "?", 1, true)
    if q then
        path = str_sub(tail, 1, q - 1)
        query = str_sub(tail, q + 1)
    end
    if path == "" then
        path = "/"
    end
    if query_in_path and query ~= "" then
        path = path .. "?" .. query
        query = ""
    end
    return { scheme, host, port, path, query }
end

function _M.request_uri(self, uri, params)
    local p = {}
    if params then
        for k, v in pairs(params) do
            p[k] = v
        end
    end
    local parsed, err = self:parse_uri(uri, false)
    if not parsed then
        return nil, err
    end
    local scheme, host, port, path, query = parsed[1], parsed[2], parsed[3], parsed[4], parsed[5]
    if not p.path then
        p.path = path
    end
    if not p.query then
        p.query = query
    end
    local ok, cerr = self:connect({
        scheme = scheme,
        host = host,
        port = port,
        pool = p.pool,
        ssl_verify = p.ssl_verify,
        ssl_server_name = p.ssl_server_name,
    })
    if not ok then
        return nil, cerr
    end
    local res, rerr = self:request(p)
    if not res then
        self:close()
        return nil, rerr
    end
    local body, berr = res:read_body()
    if not body and res.has_body then
        self:close()
        return nil, berr
    end
    res.body = body
    res:read_trailers()
    if p.keepalive == false then
        self:close()
    else
        local kok, kerr = self:set_keepalive(p.keepalive_timeout, p.keepalive_pool)
        if not kok then
            return nil, kerr
        end
    end
    res.body_reader = nil
    res.read_body = nil
    return res, nil
end

-- Not provided by the bundled client (see docs/lua-api.md): use ngx.req.get_body_data or
-- install lua-resty-http on lua_package_path.
function _M.get_client_body_reader(_)
    return nil, "get_client_body_reader is not supported by the bundled resty.http"
end

return _M
