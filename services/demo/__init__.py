"""`loopline demo`: the closed loop end to end on one machine, with an HTML report."""
