"""Shared, homework-independent pieces: device, seeding, run logging, checkpoints, data access,
the Omniglot store. Nothing here imports a homework."""
