"""The on-device daemon (runs model heads locally, offloads tails over MQTT)."""

__all__: list[str] = []
