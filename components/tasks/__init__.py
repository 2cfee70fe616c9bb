"""Task families, one module each, imported when a family is first asked for (so a run's code
is its own family's, not every family's: see ``pipelines/code.py``)."""

from components.tasks.base import Evaluator, TaskFamily, available_tasks, get_task

# Task family name -> its module under components/tasks/.
TASK_MODULES = {
    "classification": "classification",
    "detection": "detection",
    "representation": "representation",
    "retrieval": "retrieval",
    "semantic_segmentation": "segmentation",
    "instance_segmentation": "segmentation",
}

__all__ = ["TASK_MODULES", "Evaluator", "TaskFamily", "available_tasks", "get_task"]
