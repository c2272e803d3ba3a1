-- License check for the example: the tenant is the Host; unknown tenants get 403.
local _M = { _VERSION = "0.1" }

local ngx_var = ngx.var
local licenses = ngx.shared.licenses

function _M.check()
    local host = ngx_var.host
    local plan = licenses:get(host)
    if not plan then
        ngx.log(ngx.WARN, "no license for host ", host)
        return ngx.exit(ngx.HTTP_FORBIDDEN)
    end
    ngx.ctx.plan = plan
end

return _M
