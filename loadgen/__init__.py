"""Clients of the platform: the demo, the callback receiver, load generation."""
