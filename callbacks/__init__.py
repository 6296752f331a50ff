"""The callback stage: consumes finished jobs' events and delivers them to the caller's
webhook by signed HTTP POST, with per-host back-pressure, breakers and retry tiers."""
