"""Shared test settings. Fixtures specific to one area live beside its tests (tests/*_fixtures.py)."""

import os

# Keep tests away from the user's real config and ledger.
os.environ.pop("EPICONSOLE_CONFIG", None)
