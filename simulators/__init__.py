"""Device simulators publishing over real MQTT with the design's topics and payloads."""
