-- A tiny JSON API: echoes who the caller is and what the license allows.
local _M = { _VERSION = "0.1" }

local cjson = require "cjson.safe"

function _M.handle()
    local body = {
        host = ngx.var.host,
        plan = ngx.ctx.plan,
        uri = ngx.var.uri,
        args = ngx.req.get_uri_args(),
        worker = ngx.worker.id(),
    }
    ngx.say(cjson.encode(body))
end

return _M
