"""The one place the environment is read, typed and validated."""
