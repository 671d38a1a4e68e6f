"""GAN model definitions and losses (no training loop, no I/O)."""
