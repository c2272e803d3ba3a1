-- ngx time functions and ngx.sleep against lua-nginx-module's documented behaviour.

describe("ngx formatted times", function()
    it("http_time drops the fraction of a second", function()
        assert.equal("Thu, 18 Nov 2010 11:27:35 GMT", ngx.http_time(1290079655.9))
    end)

    it("http_time formats RFC 1123 dates", function()
        assert.equal("Thu, 18 Nov 2010 11:27:35 GMT", ngx.http_time(1290079655))
        assert.equal("Thu, 01 Jan 1970 00:00:00 GMT", ngx.http_time(0))
        assert.equal("Sun, 18 Sep 2039 23:06:40 GMT", ngx.http_time(2200000000))
    end)

    it("cookie_time uses dashes and a two-digit year before 2038", function()
        assert.equal("Thu, 18-Nov-10 11:27:35 GMT", ngx.cookie_time(1290079655))
    end)

    it("cookie_time switches to four digits exactly at 2038", function()
        assert.equal("Thu, 31-Dec-37 23:59:59 GMT", ngx.cookie_time(2145916799))
        assert.equal("Fri, 01-Jan-2038 00:00:00 GMT", ngx.cookie_time(2145916800))
    end)

    it("cookie_time uses a four-digit year after 2037", function()
        assert.equal("Sun, 18-Sep-2039 23:06:40 GMT", ngx.cookie_time(2200000000))
    end)

    it("parse_http_time reads what http_time writes", function()
        assert.equal(1290079655, ngx.parse_http_time("Thu, 18 Nov 2010 11:27:35 GMT"))
        for _, t in ipairs({ 0, 86399, 951782400, 1290079655, 1700000000 }) do
            assert.equal(t, ngx.parse_http_time(ngx.http_time(t)))
        end
    end)

    it("parse_http_time also reads RFC 850 and asctime dates", function()
        assert.equal(1290079655, ngx.parse_http_time("Thursday, 18-Nov-10 11:27:35 GMT"))
        assert.equal(1290079655, ngx.parse_http_time("Thu Nov 18 11:27:35 2010"))
    end)

    it("parse_http_time returns nil for garbage", function()
        assert.is_nil(ngx.parse_http_time("not a date"))
        assert.is_nil(ngx.parse_http_time(""))
    end)

    it("utctime and localtime have the documented shape", function()
        assert.matches("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$", ngx.utctime())
        assert.matches("^%d%d%d%d%-%d%d%-%d%d %d%d:%d%d:%d%d$", ngx.localtime())
        assert.matches("^%d%d%d%d%-%d%d%-%d%d$", ngx.today())
    end)

    it("utctime, localtime and today describe ngx.time()", function()
        ngx.update_time()
        local t = ngx.time()
        local utc, localt, today = ngx.utctime(), ngx.localtime(), ngx.today()
        -- A second boundary may pass between the calls: accept the next second too.
        local function one_of(fmt, value)
            return value == os.date(fmt, t) or value == os.date(fmt, t + 1)
        end
        assert.is_true(one_of("!%Y-%m-%d %H:%M:%S", utc), utc)
        assert.is_true(one_of("%Y-%m-%d %H:%M:%S", localt), localt)
        assert.is_true(one_of("%Y-%m-%d", today), today)
    end)
end)

describe("ngx.now and ngx.time", function()
    it("now has millisecond resolution and time is whole seconds", function()
        local now, t = ngx.now(), ngx.time()
        assert.is_number(now)
        assert.equal(math.floor(t), t)
        assert.equal(t, math.floor(now))
        local ms = now * 1000
        assert.near(math.floor(ms + 0.5), ms, 1e-3)
    end)

    it("are close to the system clock", function()
        ngx.update_time()
        assert.near(os.time(), ngx.time(), 1)
    end)

    it("are cached until update_time", function()
        ngx.update_time()
        local before = ngx.now()
        local start = os.clock()
        while os.clock() - start < 0.02 do
        end
        assert.equal(before, ngx.now())
        ngx.update_time()
        assert.is_true(ngx.now() >= before + 0.01)
    end)

    it("update_time never moves the clock backwards", function()
        local last = ngx.now()
        for _ = 1, 100 do
            ngx.update_time()
            local now = ngx.now()
            assert.is_true(now >= last)
            last = now
        end
    end)
end)

describe("ngx.sleep", function()
    it("advances ngx.now after update_time", function()
        ngx.update_time()
        local before = ngx.now()
        ngx.sleep(0.05)
        ngx.update_time()
        local elapsed = ngx.now() - before
        assert.is_true(elapsed >= 0.045, "slept only " .. elapsed)
        assert.is_true(elapsed < 1, "slept " .. elapsed)
    end)

    it("accepts 0", function()
        assert.has_no.errors(function() ngx.sleep(0) end)
    end)

    it("rejects a negative duration", function()
        assert.has_error(function() ngx.sleep(-1) end)
    end)
end)
