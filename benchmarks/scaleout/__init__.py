"""Scale-out benchmark: fan-out through the Kafka bus with 1, 2, 3 gateway nodes."""
