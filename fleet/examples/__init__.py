"""Example agents: small programs that behave like real ones (usage lines, exit codes, slowness)."""
