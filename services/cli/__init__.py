"""`loopline`: one command line for people and scripts."""
