"""mtls-fleet broker: an amqtt-based MQTT broker that requires client certificates."""
