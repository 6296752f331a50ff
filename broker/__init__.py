"""The broker client (the one home of aio-pika) and the one place a delivery is settled."""
