"""ophav plugin: matting."""
