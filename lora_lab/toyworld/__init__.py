"""The toy world: drawn characters whose attributes are known exactly (ground truth)."""
