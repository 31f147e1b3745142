"""Hardware and fleet: device profiles, device detection, execution backends, fleet registry."""

__all__: list[str] = []
