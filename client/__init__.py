"""Client side: local (differentially private) training; the Flower ClientApp adapter lands with issue 4."""
