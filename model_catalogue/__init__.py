"""The model catalogue (models.yaml), its sections and the input schemas it names."""
