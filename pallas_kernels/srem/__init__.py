"""SREM (DiG's spatial reorientation and enhancement module) kernels: `reference` (XLA) and `gpu` (Pallas)."""
