"""Untrusted video bytes -> the model's inputs: the window plan, the PyAV decoder, and generated clips for tests and the quickstart."""
