"""The gateway core: request validation, routing, backends, usage accounting (``core.Gateway``).

It imports nothing itself: a module that needs one part of the gateway (the relay, the router) loads that part,
not the whole gateway with its batches."""
