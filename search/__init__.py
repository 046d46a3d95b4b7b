"""The driver: CLI, job config, Tune + OptunaSearch, Pareto front, MLflow tracking, promotion."""
