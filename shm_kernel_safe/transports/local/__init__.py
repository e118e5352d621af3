"""The local transport: warm loky pools over shared memory."""
