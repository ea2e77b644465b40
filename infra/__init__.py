"""Deployment files (Kubernetes, compose, images, the Ray launcher) and the cluster rehearsal."""
