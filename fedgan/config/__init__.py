"""The run's settings, `federation.yaml` and the app bundle: plain types,
no trainer, no model, no Flower."""
