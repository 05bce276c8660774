"""Training: state, pure steps, the loop, metrics."""
