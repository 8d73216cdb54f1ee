"""Detectors: pipeline steps that turn a finished request record into findings."""
