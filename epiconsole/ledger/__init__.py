"""The ledger: campaigns, trials, checkpoints, meter samples, results and the viewers' log in SQLite.

See :mod:`epiconsole.ledger.core` for durability and concurrency, and
:mod:`epiconsole.ledger.samples` for the compact sample storage.
"""

from epiconsole.ledger.core import BUSY_TIMEOUT_S, MAX_CHUNK_SPAN_S, PRUNE_MARGIN_S, Ledger, LedgerError
from epiconsole.ledger.records import (
    CHECKPOINT_STATUSES,
    EVENT_LEVELS,
    GAP_CAUSES,
    Campaign,
    Checkpoint,
    Command,
    Event,
    Gap,
    LiveEntry,
    Marker,
    SampleCursor,
    Trial,
    TrialResult,
)
from epiconsole.ledger.samples import CHANNEL_FIELDS, TICK_FIELDS, SampleBlock, tick_dtype
from epiconsole.ledger.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "BUSY_TIMEOUT_S",
    "CHANNEL_FIELDS",
    "CHECKPOINT_STATUSES",
    "EVENT_LEVELS",
    "GAP_CAUSES",
    "MAX_CHUNK_SPAN_S",
    "MIGRATIONS",
    "PRUNE_MARGIN_S",
    "SCHEMA_VERSION",
    "TICK_FIELDS",
    "Campaign",
    "Checkpoint",
    "Command",
    "Event",
    "Gap",
    "Ledger",
    "LedgerError",
    "LiveEntry",
    "Marker",
    "SampleBlock",
    "SampleCursor",
    "Trial",
    "TrialResult",
    "tick_dtype",
]
