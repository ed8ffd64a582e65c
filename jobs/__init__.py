"""Stages, pipelines and the `raysift` CLI: in what order, with what inputs."""
