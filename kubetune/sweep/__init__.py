"""The study of a FineTuneSweep, rebuilt from its trials: pure and torch-free, shared by the
operator and local mode (Optuna samplers and pruners over an in-memory study)."""
