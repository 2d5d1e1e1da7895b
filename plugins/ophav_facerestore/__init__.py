"""ophav plugin: facerestore."""
