"""The HTTP ingress: validates jobs, authenticates callers, publishes with confirms."""
