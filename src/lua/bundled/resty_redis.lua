-- resty.redis bundled with tidegate: lua-resty-redis's API over Rust connections and a
-- per-worker Rust keepalive pool (src/lua/api/resty_redis.rs). The chunk receives the natives
-- as its argument. A copy of lua-resty-redis on lua_package_path is loaded instead of this one.
local native = ...

local rawget = rawget
local setmetatable = setmetatable
local pairs = pairs
local unpack = unpack
local n_cmd = native.cmd
local n_new = native.new
local n_pooled = native.connect_pooled

local _M = { _VERSION = "0.31" }
local mt = { __index = _M }

function _M.new(self)
    return setmetatable({ _core = n_new() }, mt)
end

local function core(self)
    local c = rawget(self, "_core")
    if not c then
        return nil
    end
    return c
end

function _M.set_timeout(self, timeout)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    return native.set_timeouts(c, timeout, timeout, timeout)
end

-- Methods that only check the object and hand it to the native side.
for _, name in ipairs({ "set_timeouts", "set_keepalive", "get_reused_times", "close", "read_reply", "commit_pipeline" }) do
    local f = native[name]
    _M[name] = function(self, ...)
        local c = core(self)
        if not c then
            return nil, "not initialized"
        end
        return f(c, ...)
    end
end

function _M.connect(self, host, port, opts)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    if n_pooled(c, host, port, opts) then
        return 1
    end
    return native.connect(c, host, port, opts)
end

function _M.init_pipeline(self, n)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    native.init_pipeline(c, n)
end

function _M.cancel_pipeline(self)
    local c = core(self)
    if not c then
        return nil, "not initialized"
    end
    native.cancel_pipeline(c)
end

local function do_cmd(self, cmd, ...)
    local c = rawget(self, "_core")
    if not c then
        return nil, "not initialized"
    end
    return n_cmd(c, cmd, ...)
end

function _M.hmset(self, hashname, ...)
    if select("#", ...) == 1 then
        local t = ...
        if type(t) == "table" then
            local array, i = {}, 0
            for k, v in pairs(t) do
                array[i + 1] = k
                array[i + 2] = v
                i = i + 2
            end
            return do_cmd(self, "hmset", hashname, unpack(array, 1, i))
        end
    end
    return do_cmd(self, "hmset", hashname, ...)
end

function _M.array_to_hash(self, t)
    local h = {}
    for i = 1, #t, 2 do
        h[t[i]] = t[i + 1]
    end
    return h
end

-- Deprecated in lua-resty-redis (methods are generated on use) but still part of its API.
function _M.add_commands(...)
    local cmds = { ... }
    for i = 1, #cmds do
        local cmd = cmds[i]
        _M[cmd] = function(self, ...)
            return do_cmd(self, cmd, ...)
        end
    end
end

-- Any other key is a Redis command: generate its method once and cache it in the module.
setmetatable(_M, {
    __index = function(_, cmd)
        local method = function(self, ...)
            return do_cmd(self, cmd, ...)
        end
        _M[cmd] = method
        return method
    end,
})

return _M
