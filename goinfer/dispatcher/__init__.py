"""The inference tier: a supervisor process and the spawned workers that run the models."""
