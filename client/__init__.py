"""Site side: the ClientApp, the one training loop, durable state and site objectives."""
