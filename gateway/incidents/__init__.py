"""The incident queue: what becomes of alerts once they leave detection.

Each concern is its own module and is tested alone (after Alertmanager): ``store`` (durable,
SQLite or PostgreSQL), ``lifecycle`` (states and who may move them), ``sla`` (deadlines, warnings,
breaches), ``policy`` (routing, silences, inhibition, storm grouping), and ``queue``, which puts
them together.
"""
