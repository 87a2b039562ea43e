-- wrk script: GET random byte ranges of WRK_LEN bytes within an object of
-- WRK_SIZE bytes (env vars), so a warm cache is read all over, not one spot.
local size = tonumber(os.getenv("WRK_SIZE"))
local len = tonumber(os.getenv("WRK_LEN"))

function setup(thread)
  thread:set("seed", math.random(1, 2147483647))
end

function init(args)
  math.randomseed(seed or os.time())
end

function request()
  local first = math.random(0, size - len)
  return wrk.format("GET", nil, {["Range"] = "bytes=" .. first .. "-" .. (first + len - 1)})
end
