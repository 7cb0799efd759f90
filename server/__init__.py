"""Server side: the Flower ServerApp adapter, strategies, central evaluation and tracking (issue 4)."""
