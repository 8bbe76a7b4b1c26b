"""fedscaled."""
