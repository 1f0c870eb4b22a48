"""Serving: the BentoML lending API and the policy engine (issue 4)."""
