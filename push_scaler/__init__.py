"""KEDA's external push scaler for inferq: wakes a model from zero on its demand events."""
