"""Everything of streetbrain that does I/O: ingest, pipeline, publishing, CLI."""
