"""Command-line tools that talk to a running Squall (``python -m tools.<name>``)."""
