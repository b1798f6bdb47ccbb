"""Mesh and sharding rules, optimizer, train step, checkpoints."""
