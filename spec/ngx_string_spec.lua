-- ngx.* string functions (base64, digests, crc32, URI escaping, query args, SQL quoting)
-- against lua-nginx-module's documented behaviour, with vectors from RFCs and the README.

local function hex(bytes)
    return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

describe("ngx base64", function()
    it("encodes with padding by default", function()
        assert.equal("aGVsbG8=", ngx.encode_base64("hello"))
        assert.equal("aGk=", ngx.encode_base64("hi"))
        assert.equal("YWJj", ngx.encode_base64("abc"))
        assert.equal("", ngx.encode_base64(""))
    end)

    it("no_padding drops the trailing =", function()
        assert.equal("aGVsbG8", ngx.encode_base64("hello", true))
        assert.equal("aGk", ngx.encode_base64("hi", true))
        assert.equal("aGVsbG8=", ngx.encode_base64("hello", false))
    end)

    it("encodes binary data", function()
        assert.equal("AAEC/w==", ngx.encode_base64("\0\1\2\255"))
    end)

    it("decodes padded and unpadded input", function()
        assert.equal("hello", ngx.decode_base64("aGVsbG8="))
        assert.equal("hello", ngx.decode_base64("aGVsbG8"))
        assert.equal("\0\1\2\255", ngx.decode_base64("AAEC/w=="))
        assert.equal("", ngx.decode_base64(""))
    end)

    it("round trips every byte value", function()
        local all = {}
        for i = 0, 255 do
            all[#all + 1] = string.char(i)
        end
        all = table.concat(all)
        assert.equal(all, ngx.decode_base64(ngx.encode_base64(all)))
        assert.equal(all, ngx.decode_base64(ngx.encode_base64(all, true)))
    end)

    it("returns nil for malformed input", function()
        assert.is_nil(ngx.decode_base64("a"))
        assert.is_nil(ngx.decode_base64("!!!!"))
        assert.is_nil(ngx.decode_base64("aGVs bG8="))
    end)
end)

describe("ngx digests", function()
    it("md5 is lowercase hex", function()
        assert.equal("5d41402abc4b2a76b9719d911017c592", ngx.md5("hello"))
        assert.equal("d41d8cd98f00b204e9800998ecf8427e", ngx.md5(""))
        assert.equal("5eb63bbbe01eeed093cb22bb8f5acdc3", ngx.md5("hello world"))
    end)

    it("md5_bin is the raw 16 bytes", function()
        local raw = ngx.md5_bin("hello")
        assert.equal(16, #raw)
        assert.equal(ngx.md5("hello"), hex(raw))
    end)

    it("sha1_bin is the raw 20 bytes", function()
        local raw = ngx.sha1_bin("hello")
        assert.equal(20, #raw)
        assert.equal("qvTGHdzF6KLavt4PO0gs2a6pQ00=", ngx.encode_base64(raw))
        assert.equal("a9993e364706816aba3e25717850c26c9cd0d89d", hex(ngx.sha1_bin("abc")))
    end)

    it("hmac_sha1 matches RFC 2202 test case 2", function()
        local digest = ngx.hmac_sha1("Jefe", "what do ya want for nothing?")
        assert.equal(20, #digest)
        assert.equal("effcdf6ae5eb2fa2d27416d5f184df9c259a7c79", hex(digest))
        assert.equal("7/zfauXrL6LSdBbV8YTfnCWafHk=", ngx.encode_base64(digest))
    end)

    it("hmac_sha1 matches RFC 2202 test case 1 (binary key)", function()
        local key = string.rep("\11", 20)
        assert.equal("b617318655057264e28bc0b6fb378c8ef146be00", hex(ngx.hmac_sha1(key, "Hi There")))
    end)

    it("crc32_short and crc32_long agree on known values", function()
        assert.equal(907060870, ngx.crc32_short("hello"))
        assert.equal(907060870, ngx.crc32_long("hello"))
        assert.equal(891568578, ngx.crc32_short("abc"))
        assert.equal(0, ngx.crc32_short(""))
        local fox = "The quick brown fox jumps over the lazy dog"
        assert.equal(1095738169, ngx.crc32_long(fox))
        assert.equal(1095738169, ngx.crc32_short(fox))
    end)
end)

describe("ngx URI escaping", function()
    it("escape_uri escapes a URI component by default", function()
        assert.equal("a%20%E4%BD%A0", ngx.escape_uri("a \228\189\160"))
        assert.equal("a%20b%2Fc%3Fd%3De%26f", ngx.escape_uri("a b/c?d=e&f"))
        assert.equal("a%2Bb", ngx.escape_uri("a+b"))
        assert.equal("%25%23%22%3C%3E", ngx.escape_uri("%#\"<>"))
    end)

    it("escape_uri leaves unreserved characters alone", function()
        local unreserved = "AZaz09-._~"
        assert.equal(unreserved, ngx.escape_uri(unreserved))
    end)

    it("escape_uri type 0 escapes only what breaks a full URI", function()
        assert.equal("/a%20b/c%3Fd%23e%25f", ngx.escape_uri("/a b/c?d#e%f", 0))
        assert.equal("http://x.test/p=1&q=a+b", ngx.escape_uri("http://x.test/p=1&q=a+b", 0))
        assert.equal("%01%7F%C3%A9", ngx.escape_uri("\1\127\195\169", 0))
    end)

    it("escape_uri rejects an out of range type", function()
        assert.has_error(function() ngx.escape_uri("x", 10) end)
    end)

    it("unescape_uri decodes %XX and +", function()
        assert.equal("b r56 7", ngx.unescape_uri("b%20r56+7"))
        assert.equal("a \228\189\160", ngx.unescape_uri("a%20%e4%bd%a0"))
        assert.equal("a \228\189\160", ngx.unescape_uri("a%20%E4%BD%A0"))
    end)

    it("unescape_uri leaves invalid sequences unchanged", function()
        assert.equal("try %search% %again%", ngx.unescape_uri("try %search%%20%again%"))
        assert.equal("%ua% %au", ngx.unescape_uri("%ua%%20%au"))
        assert.equal("%a", ngx.unescape_uri("%a"))
        assert.equal("%", ngx.unescape_uri("%"))
        assert.equal("good job%", ngx.unescape_uri("good%20job%"))
    end)

    it("escape and unescape round trip", function()
        local s = "k=v&x=y z/\1\255~"
        assert.equal(s, ngx.unescape_uri(ngx.escape_uri(s)))
    end)
end)

describe("ngx query args", function()
    it("encode_args escapes keys and values", function()
        assert.equal("b%20r=hello%20world", ngx.encode_args({ ["b r"] = "hello world" }))
        assert.equal("foo=3", ngx.encode_args({ foo = 3 }))
    end)

    it("encode_args with several keys joins them with &", function()
        local out = ngx.encode_args({ foo = 3, ["b r"] = "hello world" })
        assert.is_true(out == "foo=3&b%20r=hello%20world" or out == "b%20r=hello%20world&foo=3")
    end)

    it("encode_args repeats multi-value args in order", function()
        assert.equal("baz=32&baz=hello", ngx.encode_args({ baz = { 32, "hello" } }))
    end)

    it("encode_args: true is a bare key, false and {} are omitted", function()
        assert.equal("a", ngx.encode_args({ a = true }))
        assert.equal("", ngx.encode_args({ a = false }))
        assert.equal("", ngx.encode_args({ a = {} }))
        assert.equal("", ngx.encode_args({}))
    end)

    it("decode_args builds strings, lists and true", function()
        local args = ngx.decode_args("a=bar&b=foo&b=baz&flag&empty=")
        assert.equal("bar", args.a)
        assert.same({ "foo", "baz" }, args.b)
        assert.equal(true, args.flag)
        assert.equal("", args.empty)
    end)

    it("decode_args unescapes keys and values", function()
        local args = ngx.decode_args("b%20r=hello%20world&p=1+2")
        assert.equal("hello world", args["b r"])
        assert.equal("1 2", args.p)
    end)

    it("decode_args inverts encode_args", function()
        local t = { foo = "3", ["b r"] = "hello world", multi = { "x", "y" }, flag = true }
        assert.same(t, ngx.decode_args(ngx.encode_args(t)))
    end)

    it("decode_args stops at max_args and says truncated", function()
        local args, err = ngx.decode_args("a=1&b=2&c=3", 2)
        assert.equal("1", args.a)
        assert.equal("2", args.b)
        assert.is_nil(args.c)
        assert.equal("truncated", err)
    end)

    it("decode_args parses at most 100 args by default, 0 means no limit", function()
        local parts = {}
        for i = 1, 150 do
            parts[#parts + 1] = "k" .. i .. "=" .. i
        end
        local query = table.concat(parts, "&")
        local args = ngx.decode_args(query)
        assert.equal("100", args.k100)
        assert.is_nil(args.k101)
        args = ngx.decode_args(query, 0)
        assert.equal("150", args.k150)
    end)
end)

describe("ngx.quote_sql_str", function()
    it("wraps in single quotes", function()
        assert.equal("'hello'", ngx.quote_sql_str("hello"))
        assert.equal("''", ngx.quote_sql_str(""))
    end)

    it("escapes quotes and backslashes the MySQL way", function()
        assert.equal([['it\'s']], ngx.quote_sql_str("it's"))
        assert.equal([['say \"hi\"']], ngx.quote_sql_str('say "hi"'))
        assert.equal([['a\\b']], ngx.quote_sql_str("a\\b"))
    end)

    it("escapes control characters the MySQL way", function()
        assert.equal([['\0\b\t\n\r\Z']], ngx.quote_sql_str("\0\8\t\n\r\26"))
    end)
end)
