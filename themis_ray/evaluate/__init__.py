"""Meta-evaluation: judges scored against gold labels (metrics), and their report (tables, plots)."""
