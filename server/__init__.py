"""Server side: the ServerApp, the round driver, run outputs and the report."""
