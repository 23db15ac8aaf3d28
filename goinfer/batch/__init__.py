"""`goinfer batch`: offline inference over a file, through the same queues and dispatchers.

inputs.py reads rows (JSON Lines, CSV, Parquet) as a stream; outputs.py writes one line per row,
in input order, so that a rerun after a kill knows which rows are done; senders.py sends a row
to Redis itself (an operator's tool, no signing) or through the signed HTTP API; run.py keeps a
bounded number of rows in flight, retries transient failures and shows progress.
"""
