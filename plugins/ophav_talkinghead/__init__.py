"""ophav plugin: talkinghead."""
