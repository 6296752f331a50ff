"""The workers: Ray Serve replicas that pull jobs from RabbitMQ, batch, infer, and hand
results to the callback dispatcher."""
