"""Clients of the platform: the demo, the callback receivers, open-loop load generation."""
