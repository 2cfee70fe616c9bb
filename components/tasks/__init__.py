"""Task families, registered on import (explicit list)."""

from components.tasks import classification, detection, representation, retrieval, segmentation  # noqa: F401
from components.tasks.base import Evaluator, TaskFamily, available_tasks, get_task

__all__ = ["Evaluator", "TaskFamily", "available_tasks", "get_task"]
