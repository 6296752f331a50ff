"""What the ingress and the workers must agree on: the job envelope, the queue
topology, the callback-URL guard and the broker client both sides speak through."""
