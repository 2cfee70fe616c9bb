"""Ray Tune + Optuna searches over a run's hyperparameters and augmentation policy."""
