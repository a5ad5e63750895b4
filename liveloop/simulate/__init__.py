"""Simulated users: hidden tastes that rate liveloop's answers over HTTP, and the learning curves they give."""
