"""Discovery: trace a model, solve which hidden channels may be permuted together, and prove it (trace -> context and rules -> discover -> spec)."""
