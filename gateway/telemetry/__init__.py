"""The telemetry store: readings, alerts and incident changes in InfluxDB (v2 write API), spooled to
disk while the store is away."""
