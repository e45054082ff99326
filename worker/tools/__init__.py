"""Not the running worker: local broker and registry, demo, traffic, chaos audit, dead-letter tools."""
