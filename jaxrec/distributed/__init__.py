"""Multi-device and multi-host setup: the mesh."""
