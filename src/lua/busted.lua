-- tidegate's in-runtime spec runner: describe/it blocks, hooks, assertions, spies and stubs.
--
-- The Rust side (src/lua/spec.rs) loads this chunk once per Lua state, then for each spec file
-- calls `collect(chunk, display_name)` and drives `next_step()` until it returns nil, calling
-- every step through `call_async` so each test body runs in its own coroutine and may yield
-- (ngx.sleep and other waiting APIs). Reporting goes through the `write` function handed in.

local write = ...

local type, pairs, ipairs, tostring, select = type, pairs, ipairs, tostring, select
local setmetatable, getmetatable, rawget = setmetatable, getmetatable, rawget
local string_format, string_find, string_rep = string.format, string.find, string.rep
local table_concat, table_sort, table_insert = table.concat, table.sort, table.insert
local math_abs, math_huge = math.abs, math.huge
local lua_assert, lua_error, pcall, xpcall = assert, error, pcall, xpcall
local debug_getinfo = debug.getinfo
local unpack = unpack or table.unpack

local M = {}

local counts = { passed = 0, failed = 0, pending = 0 }

-------------------------------------------------------------------------------------------------
-- Serialization for failure messages
-------------------------------------------------------------------------------------------------

local function sort_keys(a, b)
    local ta, tb = type(a), type(b)
    if ta ~= tb then
        return ta < tb
    end
    if ta == "number" or ta == "string" then
        return a < b
    end
    return tostring(a) < tostring(b)
end

local function scalar(v)
    if type(v) == "string" then
        return string_format("%q", v)
    end
    return tostring(v)
end

local function dump(v, indent, seen)
    if type(v) ~= "table" then
        return scalar(v)
    end
    if seen[v] then
        return "<cycle: " .. tostring(v) .. ">"
    end
    seen[v] = true
    local keys = {}
    for k in pairs(v) do
        keys[#keys + 1] = k
    end
    if #keys == 0 then
        seen[v] = nil
        return "{ }"
    end
    table_sort(keys, sort_keys)
    local pad = string_rep("  ", indent + 1)
    local lines = {}
    for _, k in ipairs(keys) do
        local key
        if type(k) == "string" and string_find(k, "^[%a_][%w_]*$") then
            key = k
        else
            key = "[" .. dump(k, indent + 1, seen) .. "]"
        end
        lines[#lines + 1] = pad .. key .. " = " .. dump(v[k], indent + 1, seen)
    end
    seen[v] = nil
    return "{\n" .. table_concat(lines, ",\n") .. " }"
end

local function describe_value(v)
    if type(v) == "table" then
        local mt = getmetatable(v)
        if mt and mt.__spy then
            return "(spy) " .. tostring(rawget(v, "name") or "spy")
        end
        return "(table) " .. dump(v, 0, {})
    end
    return "(" .. type(v) .. ") " .. scalar(v)
end

M.dump = describe_value

-------------------------------------------------------------------------------------------------
-- Deep comparison and argument matchers
-------------------------------------------------------------------------------------------------

local matcher_mt = { __tostring = function(m) return "matcher: " .. m.desc end }

local function is_matcher(v)
    return type(v) == "table" and getmetatable(v) == matcher_mt
end

local function deep_same(expected, actual, seen)
    if is_matcher(expected) then
        return expected.test(actual)
    end
    if expected == actual then
        return true
    end
    if type(expected) ~= "table" or type(actual) ~= "table" then
        return false
    end
    seen = seen or {}
    local pair = seen[expected]
    if pair and pair[actual] then
        return true
    end
    if not pair then
        pair = {}
        seen[expected] = pair
    end
    pair[actual] = true
    for k, ev in pairs(expected) do
        if not deep_same(ev, actual[k], seen) then
            return false
        end
    end
    for k in pairs(actual) do
        if expected[k] == nil then
            return false
        end
    end
    return true
end

M.same = deep_same

local function args_same(expected, actual)
    if expected.n ~= actual.n then
        return false
    end
    for i = 1, expected.n do
        if not deep_same(expected[i], actual[i]) then
            return false
        end
    end
    return true
end

local match = {}

local function new_matcher(desc, test)
    return setmetatable({ desc = desc, test = test }, matcher_mt)
end

match._ = new_matcher("_", function() return true end)
match.is_ = match._
for _, t in ipairs({ "nil", "boolean", "number", "string", "table", "function", "userdata", "thread" }) do
    match["is_" .. t] = function()
        return new_matcher("is_" .. t, function(v) return type(v) == t end)
    end
end
match.is_truthy = function() return new_matcher("truthy", function(v) return v ~= nil and v ~= false end) end
match.is_falsy = function() return new_matcher("falsy", function(v) return v == nil or v == false end) end
match.is_true = function() return new_matcher("true", function(v) return v == true end) end
match.is_false = function() return new_matcher("false", function(v) return v == false end) end
match.equals = function(e) return new_matcher("equals " .. tostring(e), function(v) return v == e end) end
match.same = function(e) return new_matcher("same", function(v) return deep_same(e, v) end) end
match.matches = function(p) return new_matcher("matches " .. p, function(v)
    return type(v) == "string" and string_find(v, p) ~= nil
end) end
match.is_equal, match.is_same, match.is_matches = match.equals, match.same, match.matches

-------------------------------------------------------------------------------------------------
-- Spies and stubs
-------------------------------------------------------------------------------------------------

-- Replacements made by spy.on/stub are reverted when the scope they were made in ends (a test, or
-- a describe block for those made in setup), so one test's stub never leaks into the next.
local scopes = {}

local function track(s)
    local scope = scopes[#scopes]
    if scope then
        scope[#scope + 1] = s
    end
end

local function pack(...)
    return { n = select("#", ...), ... }
end

local spy_methods = {}
local spy_mt = { __spy = true }

spy_mt.__index = spy_methods

spy_mt.__call = function(self, ...)
    local args = pack(...)
    local call = setmetatable({ unpack(args, 1, args.n) }, {
        __index = { vals = args, n = args.n },
    })
    local calls = rawget(self, "calls")
    calls[#calls + 1] = call
    local impl = rawget(self, "impl")
    if impl == nil then
        getmetatable(call).__index.returnvals = pack()
        return
    end
    local ret = pack(impl(...))
    getmetatable(call).__index.returnvals = ret
    return unpack(ret, 1, ret.n)
end

spy_mt.__tostring = function(self)
    return "spy: " .. tostring(rawget(self, "name") or "anonymous")
end

function spy_methods.clear(self)
    self.calls = {}
    return self
end

function spy_methods.revert(self)
    local target = rawget(self, "target")
    if target and not rawget(self, "reverted") then
        target[rawget(self, "key")] = rawget(self, "original")
        self.reverted = true
    end
    return self
end

function spy_methods.call_count(self)
    return #self.calls
end

function spy_methods.called(self, n)
    if n == nil then
        return #self.calls > 0
    end
    return #self.calls == n
end

function spy_methods.called_with(self, ...)
    local expected = pack(...)
    for _, call in ipairs(self.calls) do
        if args_same(expected, call.vals) then
            return true
        end
    end
    return false
end

function spy_methods.returns(self, ...)
    local ret = pack(...)
    self.impl = function() return unpack(ret, 1, ret.n) end
    return self
end

function spy_methods.invokes(self, fn)
    self.impl = fn
    return self
end

local function new_spy(fn, name)
    if fn ~= nil and type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
        lua_error("spy.new expects a function, got " .. type(fn), 2)
    end
    return setmetatable({ calls = {}, impl = fn, name = name }, spy_mt)
end

local function is_spy(v)
    return type(v) == "table" and getmetatable(v) == spy_mt
end

local spy = setmetatable({}, { __call = function(_, fn) return new_spy(fn) end })
spy.new = function(fn) return new_spy(fn) end
spy.is_spy = is_spy

spy.on = function(target, key)
    if type(target) ~= "table" then
        lua_error("spy.on expects a table, got " .. type(target), 2)
    end
    local original = target[key]
    local s = new_spy(original or function() end, tostring(key))
    s.target, s.key, s.original = target, key, original
    target[key] = s
    track(s)
    return s
end

local function new_stub(target, key, ...)
    if target == nil then
        local s = new_spy(function() end, "stub")
        return s
    end
    if type(target) ~= "table" then
        lua_error("stub expects a table, got " .. type(target), 3)
    end
    local original = target[key]
    local s = new_spy(nil, tostring(key))
    s:returns(...)
    s.target, s.key, s.original = target, key, original
    target[key] = s
    track(s)
    return s
end

local stub = setmetatable({}, { __call = function(_, ...) return new_stub(...) end })
stub.new = function(...) return new_stub(...) end
stub.is_stub = is_spy

local mock = setmetatable({}, { __call = function(_, t, use_stubs)
    for k, v in pairs(t) do
        if type(v) == "function" then
            if use_stubs then
                new_stub(t, k)
            else
                spy.on(t, k)
            end
        end
    end
    return t
end })

local function open_scope()
    scopes[#scopes + 1] = {}
end

local function close_scope()
    local scope = scopes[#scopes]
    scopes[#scopes] = nil
    if scope then
        for i = #scope, 1, -1 do
            scope[i]:revert()
        end
    end
end

-------------------------------------------------------------------------------------------------
-- Assertions
-------------------------------------------------------------------------------------------------

local failure_mt = { __tostring = function(f) return f.message end }

local function fail(message, level)
    lua_error(setmetatable({ message = message }, failure_mt), (level or 1) + 1)
end

-- Strip "file:line: " so `has_error(fn, "boom")` matches `error("boom")` raised with a position.
local function strip_position(msg)
    if type(msg) ~= "string" then
        return msg
    end
    local stripped = msg:gsub("^[^\n]-:%d+: ", "", 1)
    return stripped
end

local function error_text(err)
    if type(err) == "table" and getmetatable(err) == failure_mt then
        return err.message
    end
    return err
end

-- Each assertion: `nargs` is how many arguments it takes before the optional custom message;
-- `test` returns ok plus the failure message for the plain and negated forms.
local assertions = {}

local function register(names, nargs, test)
    for _, name in ipairs(names) do
        assertions[name] = { nargs = nargs, test = test }
    end
end

local function two_values(what, neg_what)
    return function(args, neg)
        return nil, (neg and neg_what or what)
            .. "\nPassed in:\n" .. describe_value(args[2])
            .. "\nExpected:\n" .. (neg and "not " or "") .. describe_value(args[1])
    end
end

register({ "equal", "equals" }, 2, function(args, neg)
    local ok = args[1] == args[2]
    if ok == not neg then
        return true
    end
    return two_values("Expected objects to be equal.", "Expected objects to not be equal.")(args, neg)
end)

register({ "same" }, 2, function(args, neg)
    local ok = deep_same(args[1], args[2])
    if ok == not neg then
        return true
    end
    return two_values("Expected objects to be the same.", "Expected objects to not be the same.")(args, neg)
end)

local function one_value(name, pred)
    register({ name }, 1, function(args, neg)
        if pred(args[1]) == not neg then
            return true
        end
        return nil, "Expected object to " .. (neg and "not " or "") .. "be " .. name
            .. ", but it was:\n" .. describe_value(args[1])
    end)
end

one_value("true", function(v) return v == true end)
one_value("false", function(v) return v == false end)
one_value("nil", function(v) return v == nil end)
one_value("truthy", function(v) return v ~= nil and v ~= false end)
one_value("falsy", function(v) return v == nil or v == false end)
for _, t in ipairs({ "boolean", "number", "string", "table", "function", "userdata", "thread" }) do
    one_value(t, function(v) return type(v) == t end)
end

local function error_assertion(args, neg)
    local fn = args[1]
    if type(fn) ~= "function" and not (type(fn) == "table" and (getmetatable(fn) or {}).__call) then
        return nil, "Expected a function to call, got " .. describe_value(fn)
    end
    local ok, err = pcall(fn)
    local want_specific = args[2] ~= nil
    if neg then
        if ok then
            return true
        end
        if want_specific and not deep_same(args[2], strip_position(error_text(err)))
            and not deep_same(args[2], error_text(err)) then
            return true
        end
        return nil, "Expected no error, but got:\n" .. describe_value(error_text(err))
    end
    if ok then
        return nil, "Expected an error, but the function returned normally"
            .. (want_specific and ("\nExpected:\n" .. describe_value(args[2])) or "")
    end
    if not want_specific then
        return true
    end
    local got = error_text(err)
    if deep_same(args[2], got) or deep_same(args[2], strip_position(got)) then
        return true
    end
    return nil, "Expected a different error.\nCaught:\n" .. describe_value(got)
        .. "\nExpected:\n" .. describe_value(args[2])
end

register({ "error", "errors", "has_error", "error_raised" }, 2, error_assertion)

register({ "error_matches", "error_match" }, 4, function(args, neg)
    local fn, pattern, init, plain = args[1], args[2], args[3], args[4]
    if type(fn) ~= "function" and not (type(fn) == "table" and (getmetatable(fn) or {}).__call) then
        return nil, "Expected a function to call, got " .. describe_value(fn)
    end
    local ok, err = pcall(fn)
    local text = error_text(err)
    local matched = not ok and (type(text) == "string" or type(text) == "number")
        and string_find(tostring(text), pattern, init, plain) ~= nil
    if matched == not neg then
        return true
    end
    if ok then
        return nil, "Expected an error matching:\n" .. describe_value(pattern)
            .. "\nbut the function returned normally"
    end
    return nil, "Expected the error to " .. (neg and "not " or "") .. "match.\nCaught:\n"
        .. describe_value(text) .. "\nPattern:\n" .. describe_value(pattern)
end)

register({ "matches", "match" }, 4, function(args, neg)
    local pattern, actual, init, plain = args[1], args[2], args[3], args[4]
    local matched = (type(actual) == "string" or type(actual) == "number")
        and string_find(tostring(actual), pattern, init, plain) ~= nil
    if matched == not neg then
        return true
    end
    return nil, "Expected strings to " .. (neg and "not " or "") .. "match.\nPassed in:\n"
        .. describe_value(actual) .. "\nExpected:\n" .. describe_value(pattern)
end)

register({ "near" }, 3, function(args, neg)
    local expected, actual, tol = args[1], args[2], args[3]
    if type(expected) ~= "number" or type(actual) ~= "number" or type(tol) ~= "number" then
        return nil, "near expects numbers (expected, actual, tolerance)"
    end
    local ok = math_abs(expected - actual) <= tol
    if ok == not neg then
        return true
    end
    return nil, "Expected values to " .. (neg and "not " or "") .. "be near.\nPassed in:\n"
        .. describe_value(actual) .. "\nExpected:\n" .. describe_value(expected)
        .. " +/- " .. describe_value(tol)
end)

register({ "unique" }, 2, function(args, neg)
    local list, deep = args[1], args[2]
    local ok = true
    if type(list) ~= "table" then
        return nil, "unique expects a table"
    end
    local items = {}
    for _, v in pairs(list) do
        items[#items + 1] = v
    end
    for i = 1, #items do
        for j = i + 1, #items do
            if (deep ~= false and deep_same(items[i], items[j])) or items[i] == items[j] then
                ok = false
            end
        end
    end
    if ok == not neg then
        return true
    end
    return nil, "Expected object to " .. (neg and "not " or "") .. "be unique:\n" .. describe_value(list)
end)

local function spy_of(args)
    local s = args.subject
    if s == nil then
        s = args[1]
    end
    return s
end

local function called_assertion(compare, describe_n)
    return function(args, neg)
        local s = spy_of(args)
        if not is_spy(s) then
            return nil, "Expected a spy, got " .. describe_value(s)
        end
        local n = args.subject ~= nil and args[1] or args[2]
        local count = #s.calls
        local ok = compare(count, n)
        if ok == not neg then
            return true
        end
        return nil, "Expected " .. tostring(s) .. " to " .. (neg and "not " or "") .. "be called "
            .. describe_n(n) .. ", but it was called " .. count .. " time(s)"
    end
end

register({ "called" }, 2, called_assertion(function(count, n)
    if n == nil then
        return count > 0
    end
    return count == n
end, function(n) return n == nil and "at least once" or (n .. " time(s)") end))

register({ "called_at_least" }, 2, called_assertion(function(count, n)
    return count >= (n or 1)
end, function(n) return "at least " .. tostring(n) .. " time(s)" end))

register({ "called_at_most" }, 2, called_assertion(function(count, n)
    return count <= (n or 0)
end, function(n) return "at most " .. tostring(n) .. " time(s)" end))

local function calls_text(s)
    local lines = {}
    for i, call in ipairs(s.calls) do
        local parts = {}
        for j = 1, call.vals.n do
            parts[j] = describe_value(call.vals[j])
        end
        lines[#lines + 1] = "  call " .. i .. ": " .. table_concat(parts, ", ")
    end
    if #lines == 0 then
        return "  (no calls)"
    end
    return table_concat(lines, "\n")
end

local function with_assertion(field)
    return function(args, neg)
        local s = spy_of(args)
        local first = 1
        if args.subject == nil then
            first = 2
        end
        if not is_spy(s) then
            return nil, "Expected a spy, got " .. describe_value(s)
        end
        local expected = { n = args.n - first + 1 }
        for i = first, args.n do
            expected[i - first + 1] = args[i]
        end
        local ok = false
        for _, call in ipairs(s.calls) do
            local got = field == "vals" and call.vals or call.returnvals
            if got and args_same(expected, got) then
                ok = true
                break
            end
        end
        if ok == not neg then
            return true
        end
        local parts = {}
        for i = 1, expected.n do
            parts[i] = describe_value(expected[i])
        end
        return nil, "Expected " .. tostring(s) .. " to " .. (neg and "not " or "")
            .. (field == "vals" and "be called with:\n  " or "return:\n  ")
            .. table_concat(parts, ", ") .. "\nCalls:\n" .. calls_text(s)
    end
end

-- Argument lists of these are open-ended, so no trailing custom message is taken.
register({ "called_with" }, math_huge, with_assertion("vals"))
register({ "returned_with" }, math_huge, with_assertion("returnvals"))

local modifiers = {
    is = true, are = true, was = true, were = true, has = true, have = true, does = true,
    ["do"] = true, be = true, been = true, the = true, a = true, an = true, to = true,
    ["and"] = true,
}
local negators = { ["not"] = true, no = true }

local chain_mt = {}

local function new_chain(neg, subject)
    return setmetatable({ neg = neg, subject = subject }, chain_mt)
end

local function run_assertion(name, def, neg, subject, ...)
    local args = pack(...)
    args.subject = subject
    local custom
    -- A string past the assertion's arguments is the caller's own failure message.
    if def.nargs ~= math_huge and args.n > def.nargs and type(args[def.nargs + 1]) == "string" then
        custom = args[def.nargs + 1]
        args.n = def.nargs
    end
    local ok, message = def.test(args, neg)
    if not ok then
        fail(custom or message, 3)
    end
    return ...
end

chain_mt.__index = function(self, key)
    if type(key) ~= "string" then
        return nil
    end
    local neg = rawget(self, "neg")
    local words = {}
    for w in key:lower():gmatch("[^_]+") do
        words[#words + 1] = w
    end
    local i = 1
    while i <= #words and (modifiers[words[i]] or negators[words[i]]) do
        if negators[words[i]] then
            neg = not neg
        end
        i = i + 1
    end
    if i > #words then
        return new_chain(neg, rawget(self, "subject"))
    end
    local name = table_concat(words, "_", i)
    local def = assertions[name]
    if not def then
        -- "has_error" and friends start with a modifier word that is also part of the name.
        def = assertions[key:lower()]
        if not def then
            lua_error("unknown assertion: " .. key, 2)
        end
    end
    local subject = rawget(self, "subject")
    return function(...)
        return run_assertion(name, def, neg, subject, ...)
    end
end

local assert_api = new_chain(false, nil)

-- `assert(v, msg)` keeps Lua's own meaning; every other use goes through the chain parser.
local assert_mt = {
    __call = function(_, ...)
        return lua_assert(...)
    end,
    __index = function(_, key)
        if key == "spy" or key == "stub" then
            return function(s)
                return new_chain(false, s)
            end
        end
        if key == "fail" then
            return function(msg) fail(msg or "failed", 2) end
        end
        return assert_api[key]
    end,
}

local assert = setmetatable({}, assert_mt)

-------------------------------------------------------------------------------------------------
-- The tree of blocks and tests
-------------------------------------------------------------------------------------------------

local current_file
local current_block
local running = false
local current_test
local steps = {}
local step_index = 0

local function new_block(name, parent)
    return {
        name = name, parent = parent, children = {},
        before_each = {}, after_each = {}, setups = {}, teardowns = {},
    }
end

local function full_name(block, leaf)
    local parts = {}
    local b = block
    while b do
        if b.name then
            table_insert(parts, 1, b.name)
        end
        b = b.parent
    end
    if leaf then
        parts[#parts + 1] = leaf
    end
    return table_concat(parts, " > ")
end

local function caller_line(level)
    local info = debug_getinfo(level + 1, "Sl")
    if info and info.currentline and info.currentline > 0 then
        return info.source:gsub("^@", "") .. ":" .. info.currentline
    end
    return nil
end

local function need_block(what)
    if running or not current_block then
        lua_error(what .. " must be called inside a describe block or at the top of a spec file", 3)
    end
end

local function describe(name, fn)
    need_block("describe")
    if type(fn) ~= "function" then
        lua_error("describe expects a name and a function", 2)
    end
    local block = new_block(tostring(name), current_block)
    current_block.children[#current_block.children + 1] = { kind = "block", block = block }
    local outer = current_block
    current_block = block
    -- An error here abandons the whole file (collect resets the state), so no pcall is needed.
    fn()
    current_block = outer
end

local pending_mt = {}

local function it(name, fn)
    if running then
        lua_error("it cannot be nested inside another test", 2)
    end
    need_block("it")
    current_block.children[#current_block.children + 1] = {
        kind = "test", name = tostring(name), fn = fn, pending = fn == nil, where = caller_line(2),
    }
end

local function pending(name)
    if running then
        -- Marks the running test as pending, as busted does.
        lua_error(setmetatable({ message = name }, pending_mt), 0)
    end
    need_block("pending")
    current_block.children[#current_block.children + 1] = {
        kind = "test", name = tostring(name), pending = true, where = caller_line(2),
    }
end

local function hook(field)
    return function(fn)
        need_block(field)
        if type(fn) ~= "function" then
            lua_error(field .. " expects a function", 2)
        end
        local list = current_block[field]
        list[#list + 1] = fn
    end
end

local function finally(fn)
    if not current_test then
        lua_error("finally must be called inside a test", 2)
    end
    local list = current_test.finally
    list[#list + 1] = fn
end

-------------------------------------------------------------------------------------------------
-- Running
-------------------------------------------------------------------------------------------------

local function out(line)
    write(line .. "\n")
end

local function indent(text)
    return "    " .. tostring(text):gsub("\n", "\n    ")
end

-- Runs on the erroring stack: find the innermost frame of the spec file to name the line.
local function capture(err)
    local where
    for level = 2, 50 do
        local info = debug_getinfo(level, "Sl")
        if not info then
            break
        end
        if info.source == "@" .. current_file and info.currentline and info.currentline > 0 then
            where = current_file .. ":" .. info.currentline
            break
        end
    end
    if type(err) == "table" and getmetatable(err) == failure_mt then
        return { message = err.message, where = where }
    end
    if type(err) == "table" and getmetatable(err) == pending_mt then
        return { pending = true, message = err.message }
    end
    if type(err) ~= "string" then
        local mt = getmetatable(err)
        if mt and mt.__tostring then
            err = tostring(err)
        else
            err = describe_value(err)
        end
    end
    return { message = err, where = where }
end

local function call_protected(fn, ...)
    local ok, info = xpcall(fn, capture, ...)
    if ok then
        return nil
    end
    return info
end

local function report_failure(name, info, fallback_where)
    counts.failed = counts.failed + 1
    out("FAIL - " .. name)
    local message = tostring(info.message)
    out(indent(message))
    local where = info.where or fallback_where
    -- Runtime errors usually start with their own "file:line:"; don't repeat it.
    if where and message:sub(1, #where + 1) ~= where .. ":" then
        out("    " .. where)
    end
end

local function chain_hooks(block, field, outer_first)
    local list = {}
    local b = block
    local blocks = {}
    while b do
        table_insert(blocks, 1, b)
        b = b.parent
    end
    if not outer_first then
        local reversed = {}
        for i = #blocks, 1, -1 do
            reversed[#reversed + 1] = blocks[i]
        end
        blocks = reversed
    end
    for _, blk in ipairs(blocks) do
        for _, fn in ipairs(blk[field]) do
            list[#list + 1] = fn
        end
    end
    return list
end

local function blocked_by_setup(block)
    local b = block
    while b do
        if b.setup_failure then
            return b.setup_failure
        end
        b = b.parent
    end
    return nil
end

local function run_test(block, test)
    local name = full_name(block, test.name)
    if test.pending then
        counts.pending = counts.pending + 1
        out("pending - " .. name)
        return
    end
    local blocked = blocked_by_setup(block)
    if blocked then
        report_failure(name, { message = "setup failed: " .. tostring(blocked.message), where = blocked.where })
        return
    end
    current_test = { finally = {} }
    running = true
    open_scope()
    local failure
    for _, fn in ipairs(chain_hooks(block, "before_each", true)) do
        failure = call_protected(fn)
        if failure then
            break
        end
    end
    if not failure then
        failure = call_protected(test.fn)
    end
    for _, fn in ipairs(current_test.finally) do
        local f = call_protected(fn)
        failure = failure or f
    end
    for _, fn in ipairs(chain_hooks(block, "after_each", false)) do
        local f = call_protected(fn)
        failure = failure or f
    end
    close_scope()
    running = false
    current_test = nil
    if not failure then
        counts.passed = counts.passed + 1
        out("ok - " .. name)
    elseif failure.pending then
        counts.pending = counts.pending + 1
        out("pending - " .. name .. (failure.message and (" (" .. tostring(failure.message) .. ")") or ""))
    else
        report_failure(name, failure, test.where)
    end
end

local function has_tests(block)
    for _, child in ipairs(block.children) do
        if child.kind == "test" and not child.pending then
            return true
        end
        if child.kind == "block" and has_tests(child.block) then
            return true
        end
    end
    return false
end

-- Setups run lazily (only for blocks with something to run) and only once per block.
local function plan(block)
    local active = has_tests(block) and (#block.setups > 0 or #block.teardowns > 0)
    if active then
        steps[#steps + 1] = function()
            open_scope()
            if blocked_by_setup(block) then
                return
            end
            running = true
            for _, fn in ipairs(block.setups) do
                local failure = call_protected(fn)
                if failure then
                    block.setup_failure = failure
                    break
                end
            end
            running = false
        end
    end
    for _, child in ipairs(block.children) do
        if child.kind == "test" then
            steps[#steps + 1] = function() run_test(block, child) end
        else
            plan(child.block)
        end
    end
    if active then
        steps[#steps + 1] = function()
            if not blocked_by_setup(block) then
                running = true
                for _, fn in ipairs(block.teardowns) do
                    local failure = call_protected(fn)
                    if failure then
                        report_failure(full_name(block, "teardown"), failure)
                    end
                end
                running = false
            end
            close_scope()
        end
    end
end

--- Load one spec file: `chunk` is the compiled file, or nil plus `load_err` when it did not compile.
function M.collect(chunk, name, load_err)
    current_file = name
    steps, step_index = {}, 0
    if not chunk then
        report_failure(name, { message = load_err })
        return
    end
    local root = new_block(nil, nil)
    current_block = root
    running = false
    local failure = call_protected(chunk)
    current_block = nil
    if failure then
        report_failure(name, failure)
        return
    end
    plan(root)
end

--- The next step of the current file, or nil when the file is done.
function M.next_step()
    step_index = step_index + 1
    return steps[step_index]
end

--- Report an error that escaped a step (should not happen: steps catch their own errors).
function M.internal_failure(message)
    report_failure(tostring(current_file), { message = message })
end

function M.counts()
    return counts.passed, counts.failed, counts.pending
end

--- Globals a spec file sees.
function M.install(env)
    env.describe = describe
    env.context = describe
    env.insulate = describe
    env.expose = describe
    env.it = it
    env.spec = it
    env.test = it
    env.pending = pending
    env.before_each = hook("before_each")
    env.after_each = hook("after_each")
    env.setup = hook("setups")
    env.teardown = hook("teardowns")
    env.lazy_setup = env.setup
    env.lazy_teardown = env.teardown
    env.strict_setup = env.setup
    env.strict_teardown = env.teardown
    env.finally = finally
    env.assert = assert
    env.spy = spy
    env.stub = stub
    env.mock = mock
    env.match = match
end

return M
