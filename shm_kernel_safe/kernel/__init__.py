"""The IPython side: the extension, the magics, cell parsing and the
inspection hooks that keep variable explorers away from dangling arrays."""
