"""ophav plugin: meshwarp."""
