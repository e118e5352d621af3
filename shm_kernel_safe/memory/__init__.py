"""Shared memory: segments, arrays over them, names, capacity, the janitor
for leftovers of dead processes, and the safe close of the standard
library's ``SharedMemory``. Imports nothing above it."""
