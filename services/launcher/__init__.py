"""`loopline up`: the whole stack on one machine as supervised processes."""
