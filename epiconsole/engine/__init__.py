"""The run engine: stages, checkpoints, suspenders, validity and provenance (see :mod:`.runner`)."""

from epiconsole.engine.actions import Progress, StageActions, StageError, Window
from epiconsole.engine.events import EVENT_NAMES, EngineEvent
from epiconsole.engine.runner import ABORTED, FAILED, FINISHED, INTERRUPTED, Engine, plan_from_stored
from epiconsole.engine.suspenders import Suspenders

__all__ = [
    "ABORTED",
    "EVENT_NAMES",
    "FAILED",
    "FINISHED",
    "INTERRUPTED",
    "Engine",
    "EngineEvent",
    "Progress",
    "StageActions",
    "StageError",
    "Suspenders",
    "Window",
    "plan_from_stored",
]
