"""Devices, meshes and processes: sharding rules, multi-host set-up, XLA runtime flags."""
