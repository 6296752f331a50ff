"""The cluster manifests a model catalogue implies: one KEDA ScaledObject and one worker
Deployment per model (`task manifests` writes them; a test fails when the committed ones
drift from the catalogue). The local autoscaler applies the same ScaledObjects."""
