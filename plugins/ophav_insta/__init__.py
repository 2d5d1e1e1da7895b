"""ophav plugin: insta."""
