"""Collectors that take readings from devices (BLE via bleak, MQTT via paho) into Kafka."""
