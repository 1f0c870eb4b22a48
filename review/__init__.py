"""Model-risk review and portfolio monitoring: reports, single-decision explanations,
drift monitoring with back-tests, and the early-warning watchlist."""
