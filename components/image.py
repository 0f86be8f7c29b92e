"""The container image every component runs in on the cluster (kustomize pins the same tag)."""

IMAGE = "ghcr.io/marn-project/marn:0.1.0"
