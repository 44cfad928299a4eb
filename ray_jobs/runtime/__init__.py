"""What every job needs around its stages: connecting to Ray, the console a person reads, and the stall watchdog."""
