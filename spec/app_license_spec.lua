-- The example app's license check (lua/app/license.lua), outside any request: the request-only
-- parts of ngx (var, shared, ctx, exit, log) are stubbed around each test.

-- The runner's prefix is the current directory; make sure `require "app.license"` finds lua/.
if not package.path:find("lua/?.lua", 1, true) then
    package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
end

-- A tiny stand-in for ngx.shared.DICT with the methods the module may call.
local function fake_dict(entries)
    local data = {}
    for k, v in pairs(entries) do
        data[k] = v
    end
    return {
        get = function(_, key)
            return data[key]
        end,
        set = function(_, key, value)
            data[key] = value
            return true
        end,
    }
end

describe("app.license", function()
    local saved
    local licenses, var, ctx, exit_marker
    local license

    local STUBBED = { "var", "shared", "ctx", "exit", "log" }

    before_each(function()
        -- rawget/rawset: ngx.ctx is served by ngx's metatable and raises outside a request, so
        -- the stub goes into the table itself and removing it brings the real one back.
        saved = {}
        for _, name in ipairs(STUBBED) do
            saved[name] = rawget(ngx, name)
        end

        licenses = fake_dict({ ["acme.test"] = "gold", localhost = "free" })
        spy.on(licenses, "get")
        var = { host = "acme.test" }
        ctx = {}
        exit_marker = {}

        rawset(ngx, "var", var)
        rawset(ngx, "shared", { licenses = licenses })
        rawset(ngx, "ctx", ctx)
        rawset(ngx, "exit", spy.new(function() return exit_marker end))
        rawset(ngx, "log", spy.new(function() end))

        -- The module caches ngx.var and ngx.shared.licenses when it loads: load it after the stubs.
        package.loaded["app.license"] = nil
        license = require("app.license")
    end)

    after_each(function()
        for _, name in ipairs(STUBBED) do
            rawset(ngx, name, saved[name])
        end
        package.loaded["app.license"] = nil
    end)

    it("is an OpenResty-style module", function()
        assert.is_table(license)
        assert.is_string(license._VERSION)
        assert.is_function(license.check)
    end)

    it("a licensed host gets its plan in ngx.ctx", function()
        local result = license.check()
        assert.is_nil(result)
        assert.equal("gold", ctx.plan)
        assert.spy(ngx.exit).was_not.called()
        assert.spy(ngx.log).was_not.called()
    end)

    it("looks the plan up by the Host", function()
        license.check()
        assert.spy(licenses.get).was.called(1)
        assert.spy(licenses.get).was.called_with(licenses, "acme.test")
    end)

    it("each tenant gets its own plan", function()
        var.host = "localhost"
        license.check()
        assert.equal("free", ctx.plan)
    end)

    it("reads the host per call, not once at load", function()
        license.check()
        assert.equal("gold", ctx.plan)
        var.host = "localhost"
        license.check()
        assert.equal("free", ctx.plan)
    end)

    it("an unknown host is refused with 403", function()
        var.host = "stranger.test"
        local result = license.check()
        assert.spy(ngx.exit).was.called(1)
        assert.spy(ngx.exit).was.called_with(ngx.HTTP_FORBIDDEN)
        assert.equal(403, ngx.HTTP_FORBIDDEN)
        -- `return ngx.exit(...)`: whatever exit returns is passed on.
        assert.equal(exit_marker, result)
        assert.is_nil(ctx.plan)
    end)

    it("an unknown host is logged at warn level with the host", function()
        var.host = "stranger.test"
        license.check()
        assert.spy(ngx.log).was.called(1)
        assert.spy(ngx.log).was.called_with(ngx.WARN, "no license for host ", "stranger.test")
    end)

    it("a licence added later is seen without reloading the module", function()
        var.host = "new.test"
        license.check()
        assert.spy(ngx.exit).was.called(1)
        licenses:set("new.test", "silver")
        license.check()
        assert.equal("silver", ctx.plan)
        assert.spy(ngx.exit).was.called(1)
    end)

    it("the stubs are gone after the test", function()
        -- Checked from inside the next test's stubs: the saved values must be the real ones.
        assert.are_not.equal(var, saved.var)
        assert.is_nil(saved.ctx)
        assert.is_function(saved.exit)
        assert.is_function(saved.log)
    end)
end)

describe("app.license without stubs", function()
    it("the real ngx is back: ngx.ctx raises outside a request", function()
        assert.is_nil(rawget(ngx, "ctx"))
        assert.has_error(function() return ngx.ctx.plan end)
    end)

    it("the module is not left loaded with stubbed upvalues", function()
        assert.is_nil(package.loaded["app.license"])
    end)
end)
