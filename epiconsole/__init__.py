"""epiconsole: mission control for an Energy-Per-Intelligence lab.

Importing this package is cheap and never pulls in Textual, torch, transformers or lm_eval.
"""

__version__ = "0.1.0"
