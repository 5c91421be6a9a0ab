"""mtls-fleet devices: simulated certificate-holding devices built on paho-mqtt."""
