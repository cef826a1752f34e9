"""``icu-forecast train | compare | promote`` (wired in pipeline/cli.py)."""
