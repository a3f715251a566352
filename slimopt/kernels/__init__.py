"""Shared numerical kernels. Each family has a pure-torch reference that runs anywhere."""
from .projection import project, project_back

__all__ = ["project", "project_back"]
