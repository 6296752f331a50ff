"""The operator's tools for parked jobs and callbacks: inspect them, replay them."""
