"""The offload runtime: pure policy code (placement, policies, gate) and the engine that runs it."""
