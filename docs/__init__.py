"""The documentation site: its pages, mkdocs.yml and the hooks that generate pages from the code."""
