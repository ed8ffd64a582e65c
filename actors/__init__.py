"""Thin Ray wrappers (map_batches classes, actors) that move data and call `engine`."""
