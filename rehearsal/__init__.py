"""`task cluster:rehearse`: the kind overlay run as a kubelet would run it, as local processes
in network namespaces of their own, with a real Prometheus scraping what the monitors select."""
