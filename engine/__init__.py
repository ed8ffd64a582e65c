"""The math of raysift: pure functions on numpy arrays and torch tensors. No Ray, no file I/O."""
