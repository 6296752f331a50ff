"""Who may submit: tenants, their keys and their limits (read by the ingress)."""
