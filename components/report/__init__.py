"""The comparison: statistics over seeds (:mod:`.stats`), what MLflow holds (:mod:`.collect`) and
the report written from it (:mod:`.render`)."""
