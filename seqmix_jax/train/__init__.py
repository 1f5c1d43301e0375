"""Trainer: configs, mesh and sharding, optimizer, grain data, orbax checkpoints, metrics, the train loop."""
