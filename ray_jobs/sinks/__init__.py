"""Exactly-once output: files committed per input unit, so a killed job's rerun neither loses nor repeats a row."""
