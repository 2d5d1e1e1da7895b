"""ophav plugin: mediapipe."""
