"""Tests of the deployment files: the Dockerfile, compose and Kubernetes manifests, the image."""
