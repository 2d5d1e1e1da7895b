"""ophav plugin: reference."""
