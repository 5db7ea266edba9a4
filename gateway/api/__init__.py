"""The operators' HTTP API (FastAPI) and the dashboard it serves."""
