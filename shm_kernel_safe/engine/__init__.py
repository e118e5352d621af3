"""The engine: one run of a function over items, on any transport.

Validation, payload, planning (probe + guided chunks), the wait loop
(deadline, progress, interrupt), error mapping and gathering live here once;
the pieces both sides of a process boundary share (the protocol and the
chunk loop) too. Imports nothing of the transports that implement
:class:`~shm_kernel_safe.engine.transport.Transport`.
"""
