"""Site objectives, one module per method; all run on ``client.loop.Trainer``."""
