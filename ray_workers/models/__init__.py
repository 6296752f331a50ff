"""Built-in models behind one small interface (`models.base.Model`)."""
