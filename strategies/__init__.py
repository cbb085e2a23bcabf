"""Server side of each method: one Flower Message-API strategy per file."""
