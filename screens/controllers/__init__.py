"""Screen controllers: plain Python (no Textual) that turn ledger/live state into frozen view data and
key presses into lab commands. Each screen renders what its controller hands it and nothing else."""
