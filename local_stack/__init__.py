"""`task up`: the whole pipeline on one machine (ingress, Ray Serve workers, callback
dispatcher, local autoscaler) against a local RabbitMQ."""
