"""The object store behind the S3 API: inputs by reference (uploads the ingress presigns)."""
