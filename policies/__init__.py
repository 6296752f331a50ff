"""Policies the services share: the circuit breaker and byte-bounded prefetch (pure, tested
with tables), and the callback-URL guard (which also resolves names, off the event loop)."""
