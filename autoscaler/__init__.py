"""The local autoscaler: applies the KEDA ScaledObjects' rules (queue length -> replicas)
on one machine, as KEDA does in a cluster."""
