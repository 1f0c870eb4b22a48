"""Training: Optuna-tuned LightGBM per product, tracked and registered in MLflow (issue 3)."""
