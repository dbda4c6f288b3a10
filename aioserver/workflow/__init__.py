"""Workflows: txtai's YAML shape, run by an asyncio engine.

``spec`` parses the config's ``workflow:`` section, ``actions`` resolves action names
(pipelines, built-ins, dotted paths), ``engine`` runs tasks over batches of elements and
``builtins`` holds the actions that need no code of the user's.
"""

from .engine import Action, Task, Workflow

__all__ = ["Action", "Task", "Workflow"]
