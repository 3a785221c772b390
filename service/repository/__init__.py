"""The model repository: reading its files safely, planning which versions serve, loading and retiring them."""
