"""What travels between the components: the job envelope, job and callback messages, the
queue topology and its retry tiers."""
