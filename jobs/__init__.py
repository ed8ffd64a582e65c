"""Stages, pipelines and the `raysift` CLI: in what order, with what inputs."""

__version__ = "0.1.0"
