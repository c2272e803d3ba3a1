-- The bundled resty.http and resty.redis outside a request: the parts that need no server
-- (URI parsing, helpers, argument checks) and errors from a port nobody listens on.

describe("resty.http (bundled)", function()
    local http = require "resty.http"

    it("parses URIs like lua-resty-http", function()
        local h = http.new()
        local p = h:parse_uri("http://example.com/a?b=c")
        assert.same({ "http", "example.com", 80, "/a?b=c", "" }, p)
        p = h:parse_uri("https://example.com:8443/x?y=1", false)
        assert.same({ "https", "example.com", 8443, "/x", "y=1" }, p)
        p = h:parse_uri("//example.com")
        assert.same({ "http", "example.com", 80, "/", "" }, p)
        p = h:parse_uri("http://[::1]:81/")
        assert.same({ "http", "[::1]", 81, "/", "" }, p)
    end)

    it("rejects bad URIs", function()
        local p, err = http.new():parse_uri("example.com/x")
        assert.is_nil(p)
        assert.equal("bad uri: example.com/x", err)
        p, err = http.new():parse_uri("http://h:port/")
        assert.is_nil(p)
        assert.equal("bad uri: http://h:port/", err)
    end)

    it("reports requests without a connection as closed", function()
        local res, err = http.new():request({ path = "/" })
        assert.is_nil(res)
        assert.equal("closed", err)
    end)
end)

describe("resty.redis (bundled)", function()
    local redis = require "resty.redis"

    it("turns arrays into hashes", function()
        local h = redis:new():array_to_hash({ "a", "1", "b", "2" })
        assert.same({ a = "1", b = "2" }, h)
    end)

    it("answers commands on an unconnected object with closed", function()
        local red = redis:new()
        local res, err = red:get("x")
        assert.is_nil(res)
        assert.equal("closed", err)
        assert.same({ nil, "closed" }, { red:get_reused_times() })
    end)

    it("generates command methods once and caches them", function()
        local f = redis.some_new_command
        assert.equal("function", type(f))
        assert.equal(f, redis.some_new_command)
    end)

    it("refuses objects that were not made by new", function()
        local res, err = redis.get({}, "x")
        assert.is_nil(res)
        assert.equal("not initialized", err)
    end)
end)
