"""Constants of the HTTP protocol that the handlers and the client share (no torch, no NumPy)."""

MAX_SEED = 2**63 - 1  # X-Eden-Seed: 0 <= seed <= MAX_SEED
