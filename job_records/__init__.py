"""Job records in Redis (the one home of redis): status, cancel, idempotency keys and their Lua scripts."""
